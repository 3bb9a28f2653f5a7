"""Bad input against the real API process: every invalid spec is a 422 naming the layer index
and the reason, wrong types name their field, unknown ids are 404, no token is 401, and a
refused submission leaves no job behind."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.factories import digits_cnn, train_request
from tests.models.test_spec import INVALID, SCHEMA_INVALID

UNKNOWN = "0123456789abcdef0123456789abcdef"


def job_count(client: httpx.Client) -> int:
    total, cursor = 0, None
    while True:
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        total += len(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return total


def refused(client: httpx.Client, body: Any, *, status: int = 422, **kw: Any) -> Any:
    """POST /v1/jobs, expect `status`, and check that no job row was written."""
    before = job_count(client)
    r = client.post("/v1/jobs", json=body, **kw) if "content" not in kw else \
        client.post("/v1/jobs", **kw)
    assert r.status_code == status, r.text
    assert job_count(client) == before
    return r.json()["detail"]


def errors_at(detail: Any, *path: Any) -> list[dict[str, Any]]:
    """The errors whose loc contains `path` as a contiguous run."""
    n = len(path)
    return [e for e in detail if any(tuple(e["loc"][i:i + n]) == path
                                     for i in range(len(e["loc"]) - n + 1))]


def model_of(input_shape: list[int], layers: list[dict[str, Any]], num_classes: int | None
             ) -> dict[str, Any]:
    return {"input_shape": input_shape, "num_classes": num_classes, "layers": layers}


# --- invalid specs: POST /v1/jobs and POST /v1/models/summary ---------------------------------

@pytest.mark.parametrize(("input_shape", "layers", "num_classes", "index", "reason"),
                         [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_spec_is_422_naming_layer_and_reason(client, input_shape, layers, num_classes,
                                                     index, reason):
    model = model_of(input_shape, layers, num_classes)
    for detail in (refused(client, train_request(1, model=model)),
                   client.post("/v1/models/summary", json=model).json()["detail"]):
        (error,) = errors_at(detail, "layers", index)
        assert reason in error["msg"]
        assert error["msg"].startswith(f"layer {index} ({layers[index]['type']}): ")
    r = client.post("/v1/models/summary", json=model)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "layers", index]


@pytest.mark.parametrize(("layers", "loc"), [c[1:] for c in SCHEMA_INVALID],
                         ids=[c[0] for c in SCHEMA_INVALID])
def test_schema_invalid_layer_is_422_naming_layer_and_field(client, layers, loc):
    model = model_of([1, 8, 8], [{"type": "relu"}, *layers], None)
    detail = refused(client, train_request(1, model=model))
    assert errors_at(detail, "model", *loc), detail
    r = client.post("/v1/models/summary", json=model)
    assert r.status_code == 422
    assert errors_at(r.json()["detail"], *loc), r.json()


def test_unknown_layer_type_message_lists_the_known_types(client):
    model = model_of([1, 8, 8], [{"type": "conv3d", "out_channels": 4}], None)
    (error,) = errors_at(refused(client, train_request(1, model=model)), "model", "layers", 0)
    assert "conv3d" in error["msg"] and "conv2d" in error["msg"]


# --- wrong types and values name their field --------------------------------------------------

def _with(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(train_request(1))
    *parents, last = path.split(".")
    node = body
    for p in parents:
        node = node[p]
    node[last] = value
    return body


WRONG = [
    ("string epochs", _with("train.epochs", "three"), ("train", "epochs")),
    ("zero epochs", _with("train.epochs", 0), ("train", "epochs")),
    ("float batch_size", _with("train.batch_size", 6.5), ("train", "batch_size")),
    ("huge lr", _with("train.lr", 1e6), ("train", "lr")),
    ("negative lr", _with("train.lr", -0.1), ("train", "lr")),
    ("unknown optimizer", _with("train.optimizer", "lbfgs"), ("train", "optimizer")),
    ("list as model", _with("model", [1, 2, 3]), ("model",)),
    ("string as model", _with("model", "lenet5"), ("model",)),
    ("unknown preset", _with("model", {"preset": "resnet"}), ("model",)),
    ("list as preset", _with("model", {"preset": ["lenet5"]}), ("model", "preset")),
    ("zero num_classes", _with("model", {"preset": "lenet5", "num_classes": 0}),
     ("model", "num_classes")),
    ("string input_shape", _with("model.input_shape", "1x8x8"), ("model", "input_shape")),
    ("missing model", {k: v for k, v in train_request(1).items() if k != "model"}, ("model",)),
    ("unknown device", _with("device", "tpu"), ("device",)),
    ("int name", _with("name", 5), ("name",)),
    ("unknown top-level field", _with("epochs", 3), ("epochs",)),
    ("unknown dataset name", _with("dataset", {"name": "mnist"}), ("dataset",)),
    ("dataset as string", _with("dataset", "digits"), ("dataset",)),
    ("zero checkpoint_every.epochs", _with("checkpoint_every", {"epochs": 0}),
     ("checkpoint_every", "epochs")),
    ("negative checkpoint_every.min_seconds",
     _with("checkpoint_every", {"epochs": 1, "min_seconds": -1}),
     ("checkpoint_every", "min_seconds")),
    ("string checkpoint_every.min_seconds",
     _with("checkpoint_every", {"min_seconds": "often"}), ("checkpoint_every", "min_seconds")),
    ("unknown checkpoint_every field", _with("checkpoint_every", {"steps": 100}),
     ("checkpoint_every", "steps")),
    ("checkpoint_every as number", _with("checkpoint_every", 5), ("checkpoint_every",)),
    ("infinite checkpoint_every.min_seconds",
     _with("checkpoint_every", {"min_seconds": "Infinity"}), ("checkpoint_every", "min_seconds")),
    ("checkpoint_every.min_seconds beyond a week",
     _with("checkpoint_every", {"min_seconds": 1e9}), ("checkpoint_every", "min_seconds")),
    ("huge checkpoint_every.epochs", _with("checkpoint_every", {"epochs": 10**30}),
     ("checkpoint_every", "epochs")),
]


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in WRONG], ids=[c[0] for c in WRONG])
def test_wrong_type_or_value_is_422_naming_the_field(client, body, field):
    detail = refused(client, body)
    assert errors_at(detail, *field), detail
    assert all(e["msg"] for e in detail)


def test_unknown_kind_is_422_naming_kind(client):
    detail = refused(client, {**train_request(1), "kind": "bake"})
    assert any("kind" in str(e["loc"]) or "kind" in e["msg"] for e in detail), detail


def test_body_that_is_not_json_is_refused(client):
    detail = refused(client, None, content=b"{not json",
                     headers={"content-type": "application/json"})
    assert detail[0]["loc"][0] == "body"
    r = client.post("/v1/jobs", content=b"kind=train", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def test_unknown_dataset_id_is_422_naming_dataset_id(client):
    detail = refused(client, train_request(1, dataset={"id": UNKNOWN}))
    (error,) = errors_at(detail, "dataset", "id")
    assert UNKNOWN in error["msg"]


@pytest.mark.parametrize(("model_shape", "dataset", "data_shape"), [
    ((1, 16, 16), {"name": "digits"}, "[1, 8, 8]"),
    ((1, 16, 16), {"name": "synthetic", "size": 16, "channels": 3}, "[3, 16, 16]"),
    ((3, 8, 8), {"name": "synthetic", "size": 16, "channels": 3}, "[3, 16, 16]"),
])
def test_input_shape_not_matching_the_dataset_is_422(client, model_shape, dataset, data_shape):
    model = digits_cnn(input_shape=model_shape, num_classes=4 if "size" in dataset else 10)
    detail = refused(client, train_request(1, model=model, dataset=dataset))
    (error,) = errors_at(detail, "model", "input_shape")
    assert str(list(model_shape)) in error["msg"] and data_shape in error["msg"]


def test_too_few_outputs_for_the_dataset_is_422(client):
    detail = refused(client, train_request(1, model=digits_cnn(num_classes=3)))
    assert errors_at(detail, "model", "layers"), detail
    assert "10 classes" in detail[0]["msg"]


# --- any mutation of a valid body: a 4xx with a detail, never a 500 ---------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
    | st.sampled_from([0, -1, 10**9, 2**63, 1e308, "", "x" * 5000, [1] * 5000]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=8,
)
BODIES = [
    ("/v1/jobs", train_request(1)),
    ("/v1/models/summary", digits_cnn()),
    ("/v1/jobs", {"kind": "feature_maps", "source": {"job_id": UNKNOWN},
                  "inputs": {"dataset": "digits", "indices": [0, 1]}, "layers": None}),
]


def paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        found += paths(child, (*prefix, key))
    return found


@settings(max_examples=100, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=st.sampled_from(BODIES), where=st.randoms(use_true_random=False), value=JSON)
def test_any_mutated_body_gets_a_client_error_never_a_500(client, case, where, value):
    endpoint, body = case[0], copy.deepcopy(case[1])
    path = where.choice(paths(body)[1:])
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    r = client.post(endpoint, json=body)
    assert r.status_code in (200, 201, 404, 413, 422), (path, value, r.status_code, r.text)
    if r.status_code == 201:  # the mutation happened to be valid: don't leave work behind
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")
    elif r.status_code >= 400:
        assert r.json()["detail"], r.text


# --- unknown ids: 404 -------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("GET", "/v1/jobs/{id}/metrics"),
    ("GET", "/v1/jobs/{id}/logs"),
    ("GET", "/v1/jobs/{id}/checkpoints"),
    ("GET", "/v1/jobs/{id}/checkpoints/last"),
    ("GET", "/v1/jobs/{id}/checkpoints/epoch-0001.safetensors"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/jobs/{id}/feature-maps"),
])
@pytest.mark.parametrize("job_id", [UNKNOWN, "not-a-hex-id", "x" * 300])
def test_unknown_job_is_404(client, method, path, job_id):
    r = client.request(method, path.format(id=job_id))
    assert r.status_code == 404, r.text
    assert "not found" in r.json()["detail"]


def test_unknown_checkpoint_name_is_404(client):
    r = client.post("/v1/jobs", json=train_request(1))
    assert r.status_code == 201
    job_id = r.json()["id"]
    for name in ("epoch-9999.safetensors", "..%2F..%2Fetc%2Fpasswd", "nope"):
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/{name}")
        assert r.status_code == 404, r.text
        assert "not found" in r.json()["detail"].lower()


# --- authentication ---------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/v1/jobs"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{UNKNOWN}"),
    ("POST", "/v1/models/summary"), ("GET", "/v1/datasets"),
])
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic dGVzdDp0ZXN0", "Bearer"])
def test_missing_or_bad_token_is_401(stack, client, method, path, auth):
    writes = path == "/v1/jobs" and method == "POST"
    before = job_count(client) if writes else 0
    headers = {"Authorization": auth} if auth else {}
    with httpx.Client(base_url=stack.url, timeout=30) as anonymous:
        r = anonymous.request(method, path, headers=headers,
                              json=train_request(1) if method == "POST" else None)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    if writes:
        assert job_count(client) == before


# --- POST /v1/models/summary: the success shape -----------------------------------------------

def test_model_summary_shape(client):
    r = client.post("/v1/models/summary", json=digits_cnn())
    assert r.status_code == 200, r.text
    s = r.json()
    assert [(la["index"], la["type"]) for la in s["layers"]] == [
        (0, "conv2d"), (1, "relu"), (2, "maxpool2d"), (3, "flatten"), (4, "linear")]
    assert [la["output_shape"] for la in s["layers"]] == [
        [16, 8, 8], [16, 8, 8], [16, 4, 4], [256], [10]]
    assert [la["params"] for la in s["layers"]] == [16 * 9 + 16, 0, 0, 0, 256 * 10 + 10]
    assert [la["receptive_field"] for la in s["layers"]][:3] == [[3, 3], [3, 3], [4, 4]]
    assert s["layers"][0]["flops"] == 2 * 9 * 16 * 8 * 8
    assert s["total_params"] == 16 * 9 + 16 + 256 * 10 + 10
    assert s["output_shape"] == [10]
    assert s["fully_connected_equivalent"]["params"] == 64 * 1024 + 1024
    assert {"total_flops", "activation_bytes_per_sample"} <= s.keys()


def test_model_summary_of_a_preset(client):
    r = client.post("/v1/models/summary", json={"preset": "lenet5"})
    assert r.status_code == 200, r.text
    assert r.json()["input_shape"] == [1, 32, 32]
    assert r.json()["total_params"] == 61_706
    r = client.post("/v1/models/summary", json={"preset": "lenet5-padded",
                                                "input_shape": [1, 8, 8]})
    assert r.status_code == 200, r.text
    assert r.json()["layers"][-1]["output_shape"] == [10]
    assert r.json()["input_shape"] == [1, 8, 8]
    # the published LeNet-5 does not fit 8x8: a 422 naming its second convolution
    r = client.post("/v1/models/summary", json={"preset": "lenet5", "input_shape": [1, 8, 8]})
    assert r.status_code == 422, r.text
    assert "layer 3 (conv2d)" in r.text
