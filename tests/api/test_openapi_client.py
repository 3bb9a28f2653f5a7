"""The OpenAPI document tells the truth: a client generated from the live /openapi.json with
openapi-python-client (raise_on_unexpected_status on) drives a train job, a feature-map job
and the error cases, and parses every answer. A status the document leaves out raises
UnexpectedStatus, so an undocumented status added to a route fails here."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.factories import digits_cnn, feature_maps_request, train_request
from tests.services import TOKEN, Stack, api_on_sqlite

PACKAGE = "convoy_generated_client"


@pytest.fixture(scope="module")
def gen(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The generated package, imported."""
    home = tmp_path_factory.mktemp("openapi-client")
    spec = home / "openapi.json"
    spec.write_text(httpx.get(f"{stack.url}/openapi.json", timeout=30).text)
    exe = Path(sys.executable).with_name("openapi-python-client")
    env = {**os.environ, "PATH": f"{exe.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run([str(exe), "generate", "--path", str(spec), "--meta", "none",
                          "--output-path", str(home / PACKAGE)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    sys.path.insert(0, str(home))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(home))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def op(gen: ModuleType, tag: str, name: str) -> ModuleType:
    """The module of one operation, by its tag and the start of its function name."""
    package = importlib.import_module(f"{PACKAGE}.api.{tag}")
    found = [m for m in (Path(package.__file__ or "").parent).glob(f"{name}_*.py")]
    assert len(found) == 1, (tag, name, found)
    return importlib.import_module(f"{PACKAGE}.api.{tag}.{found[0].stem}")


def model(gen: ModuleType, name: str) -> Any:
    return getattr(importlib.import_module(f"{PACKAGE}.models"), name)


def client(gen: ModuleType, stack: Stack, token: str = TOKEN, **kwargs: Any) -> Any:
    return gen.AuthenticatedClient(base_url=stack.url, token=token, timeout=httpx.Timeout(60),
                                   raise_on_unexpected_status=True, **kwargs)


def wait_state(gen: ModuleType, api: Any, job_id: str, timeout: float = 120) -> Any:
    get_job = op(gen, "jobs", "get_job")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = get_job.sync(job_id, client=api)
        assert isinstance(job, model(gen, "JobOut")), job
        if job.state in ("succeeded", "failed", "canceled"):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def is_error(gen: ModuleType, answer: Any, status: int, response: Any) -> None:
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert isinstance(answer, model(gen, "ErrorOut")), answer
    assert answer.detail, answer


def test_train_and_feature_maps_through_the_generated_client(gen: ModuleType, stack: Stack
                                                             ) -> None:
    api = client(gen, stack)
    submit = op(gen, "jobs", "submit_job")
    train = model(gen, "TrainJobRequest").from_dict(train_request(1, model=digits_cnn(4)))
    created = submit.sync_detailed(client=api, body=train)
    assert created.status_code == 201, created.content
    job = wait_state(gen, api, created.parsed.id)
    assert job.state == "succeeded", job
    assert isinstance(job.result, model(gen, "TrainResult")), job.result
    assert job.result.epochs_done == 1
    assert isinstance(job.summary, model(gen, "ModelSummary"))
    assert job.summary.total_params > 0 and job.summary.layers[0].receptive_field == [3, 3]
    metrics = op(gen, "jobs", "get_metrics").sync(job.id, client=api)
    assert "val_accuracy" in metrics.series.additional_properties
    checkpoints = op(gen, "jobs", "list_checkpoints").sync(job.id, client=api)
    assert checkpoints, checkpoints
    blob = op(gen, "jobs", "download_checkpoint").sync(job.id, "last", client=api)
    assert blob.payload.read(8), blob  # a File: the .safetensors bytes
    # the same job again under its Idempotency-Key-less body is a new job; cancel the finished
    # one: 409
    cancel = op(gen, "jobs", "cancel_job").sync_detailed(job.id, client=api)
    is_error(gen, cancel.parsed, 409, cancel)

    fm = model(gen, "FeatureMapsJobRequest").from_dict(
        feature_maps_request({"job_id": job.id}, layers=["0", "2"], png=True))
    created = submit.sync_detailed(client=api, body=fm)
    assert created.status_code == 201, created.content
    done = wait_state(gen, api, created.parsed.id)
    assert done.state == "succeeded", done
    assert isinstance(done.result, model(gen, "FeatureMapsResult")), done.result
    listing = op(gen, "feature_maps", "list_feature_maps").sync(done.id, client=api)
    assert isinstance(listing, model(gen, "FeatureMapList"))
    assert [layer.index for layer in listing.layers] == [0, 2]
    assert len(listing.layers[0].stats.mean) == 4
    get_map = op(gen, "feature_maps", "get_feature_map")
    npy = get_map.sync(done.id, "0", client=api)
    assert npy.payload.read(6) == b"\x93NUMPY"
    fmt = model(gen, "GetFeatureMapV1JobsJobIdFeatureMapsLayerGetFormat")
    png = get_map.sync(done.id, "0", client=api, format_=fmt.PNG, image=1)
    assert png.payload.read(8) == b"\x89PNG\r\n\x1a\n"
    missing = get_map.sync_detailed(done.id, "9", client=api)
    is_error(gen, missing.parsed, 404, missing)


def test_error_cases_parse(gen: ModuleType, stack: Stack) -> None:
    api = client(gen, stack)
    get_job = op(gen, "jobs", "get_job")
    # 401: a token that is not one
    answer = get_job.sync_detailed("0" * 32, client=client(gen, stack, token="not-a-token"))
    is_error(gen, answer.parsed, 401, answer)
    assert answer.headers["www-authenticate"] == "Bearer"
    # 404: no such job
    answer = get_job.sync_detailed(uuid.uuid4().hex, client=api)
    is_error(gen, answer.parsed, 404, answer)
    # 422: an invalid spec (a linear layer on a [C, H, W] map); its detail is the list
    summary = op(gen, "models", "summarize_model")
    bad = model(gen, "FullSpec").from_dict(
        {"input_shape": [1, 8, 8], "layers": [{"type": "linear", "out_features": 3}]})
    answer = summary.sync_detailed(client=api, body=bad)
    is_error(gen, answer.parsed, 422, answer)
    assert answer.parsed.detail[0].msg, answer.parsed.detail
    # a preset by name is a body the document accepts, and its summary is typed
    preset = model(gen, "PresetSpec").from_dict({"preset": "vgg-small"})
    answer = summary.sync_detailed(client=api, body=preset)
    assert answer.status_code == 200 and answer.parsed.total_params > 0, answer.content[:300]
    # 413: a body over max_request_bytes (1 MiB)
    huge = model(gen, "TrainJobRequest").from_dict({**train_request(1), "name": "x" * 2**21})
    answer = op(gen, "jobs", "submit_job").sync_detailed(client=api, body=huge)
    is_error(gen, answer.parsed, 413, answer)
    # 415: a body of another content type
    def as_text(request: httpx.Request) -> None:
        request.headers["Content-Type"] = "text/plain"

    text = client(gen, stack, httpx_args={"event_hooks": {"request": [as_text]}})
    answer = summary.sync_detailed(client=text, body=preset)
    is_error(gen, answer.parsed, 415, answer)
    # 403: an admin route with a tenant's token
    tokens = op(gen, "tokens", "create")
    made = tokens.sync(client=api, body=model(gen, "TokenIn").from_dict(
        {"tenant": f"t{uuid.uuid4().hex[:8]}", "name": "openapi"}))
    answer = op(gen, "tokens", "list_tokens").sync_detailed(
        client=client(gen, stack, token=made.token))
    is_error(gen, answer.parsed, 403, answer)
    # readiness is typed
    ready = op(gen, "health", "readyz").sync(client=gen.Client(base_url=stack.url))
    assert ready.checks.database == "ok" and ready.checks.broker == "ok"


def test_queue_quota_429(gen: ModuleType, tmp_path: Path) -> None:
    """An API with room for one queued job (no worker takes it): the second is a 429 with
    Retry-After, parsed as the error body."""
    with api_on_sqlite(tmp_path, CONVOY_MAX_QUEUED_PER_TENANT="1",
                       CONVOY_REQUEUE_AFTER_SECONDS="3600") as api_only:
        api = client(gen, api_only)
        submit = op(gen, "jobs", "submit_job")
        body = model(gen, "TrainJobRequest").from_dict(train_request(1, model=digits_cnn(4)))
        assert submit.sync_detailed(client=api, body=body).status_code == 201
        answer = submit.sync_detailed(client=api, body=body)
        is_error(gen, answer.parsed, 429, answer)
        assert int(answer.headers["retry-after"]) > 0


def test_statuses_hard_to_cause_live_are_declared(gen: ModuleType) -> None:
    """503 and 507 parse as the error body with Retry-After; a status no route
    declares raises UnexpectedStatus (what a route answering an undocumented status meets)."""
    api = gen.AuthenticatedClient(base_url="http://unused", token=TOKEN,
                                  raise_on_unexpected_status=True)
    submit = op(gen, "jobs", "submit_job")
    fake = httpx.Response(503, headers={"Retry-After": "5"},
                          content=json.dumps({"detail": "the database is busy"}).encode())
    assert isinstance(submit._build_response(client=api, response=fake).parsed,
                      model(gen, "ErrorOut"))
    upload = op(gen, "uploads", "upload_inputs")
    fake = httpx.Response(507, content=b'{"detail": "store full"}')
    assert isinstance(upload._build_response(client=api, response=fake).parsed,
                      model(gen, "ErrorOut"))
    with pytest.raises(gen.errors.UnexpectedStatus):
        submit._build_response(client=api, response=httpx.Response(418, content=b"{}"))


def test_options_lists_every_method(stack: Stack) -> None:
    for path, allow in [("/v1/jobs", "GET, OPTIONS, POST"),
                        ("/v1/jobs/abc", "DELETE, GET, OPTIONS"),
                        ("/v1/tokens/abc", "DELETE, OPTIONS"), ("/healthz", "GET, OPTIONS"),
                        ("/v1/jobs/abc/feature-maps/2", "GET, OPTIONS")]:
        answer = httpx.options(stack.url + path, timeout=30)
        assert (answer.status_code, answer.headers.get("allow")) == (204, allow), path
    assert httpx.options(stack.url + "/v1/nothing", timeout=30).status_code == 404


def test_document_declares_token_and_errors(stack: Stack) -> None:
    doc = httpx.get(f"{stack.url}/openapi.json", timeout=30).json()
    scheme = doc["components"]["securitySchemes"]["bearer"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            where = f"{method.upper()} {path}"
            if path.startswith("/v1/") or path == "/metrics":  # (/metrics: unless public)
                assert operation["security"] == [{"bearer": []}], where
                assert {"401", "503"} <= set(operation["responses"]), where
                assert "Retry-After" in operation["responses"]["503"]["headers"], where
            else:
                assert "security" not in operation, where
            if "{" in path:
                assert "404" in operation["responses"], where
            for status, response in operation["responses"].items():
                if int(status) >= 400 and path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorOut"}, where
    ready = doc["paths"]["/readyz"]["get"]["responses"]["503"]
    assert ready["content"]["application/json"]["schema"]["$ref"].endswith("/ReadyOut")

