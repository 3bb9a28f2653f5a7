"""Path traversal: hostile values in every path parameter of every operation (taken from the
live OpenAPI spec) give 404 or 422 and never the contents of a marker file planted next to the
artifact root; the store itself refuses any key it did not build."""

from __future__ import annotations

import http.client
import re
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from convoy.artifacts import BadKey, LocalStore, check_key, job_key
from tests.security.conftest import Owned
from tests.services import ROOT, TOKEN, Stack

SECRET = f"marker-{uuid.uuid4().hex}"


def payloads(marker: Path) -> list[str]:
    """Raw path segments, sent verbatim (no client-side normalisation of dot segments)."""
    rel = marker.name
    ups = ["../" * n + rel for n in range(1, 6)]
    return [
        *(quote(u, safe="") for u in ups),                      # ..%2F..%2Fmarker
        *(u.replace("/", "%5C") for u in ups[:3]),              # ..\..\marker
        *(u.replace("/", "\\") for u in ups[:2]),               # raw backslashes
        quote(str(marker), safe=""),                            # %2Ftmp%2F...%2Fmarker
        quote(str(marker), safe="").replace("%2F", "%5C"),
        "%2e%2e%2f" * 3 + rel,                                  # encoded dots
        "%252e%252e%252f" * 3 + rel,                            # double-encoded
        "....%2F%2F" * 3 + rel,
        "..", "%2e%2e", ".", "~", "%2F", "%5C",
        "%00", "%00" + rel, "epoch-0001.safetensors%00.png", "..%00%2F" + rel,
        "a" * 4096, "%2E" * 1000,
        "file:%2F%2F" + quote(str(marker), safe=""),
        "last%2F..%2F..%2F" + rel,
        "C:%5Cwindows%5Cwin.ini",
    ]


@pytest.fixture(scope="module")
def marker(stack: Stack) -> Path:
    """Beside the artifact root (home/artifacts), where `../` from a key would land."""
    path = stack.home / "secret-marker.txt"
    path.write_text(SECRET)
    (stack.home / "artifacts").mkdir(exist_ok=True)
    (stack.home / "artifacts" / "secret-marker.txt").write_text(SECRET)  # a stray file there
    return path


def valid_values(o: Owned, path: str) -> dict[str, str]:
    feature = "feature-maps" in path
    return {
        "job_id": (o.feature_job or o.train_job) if feature else o.train_job,
        "name": o.checkpoint,
        "layer": o.feature_layer or "0",
        "dataset_id": o.dataset,
        "checkpoint_id": o.checkpoint_upload or "0",
        "input_id": o.input_upload or "0",
        "token_id": "0" * 32,
    }


def raw_get(stack: Stack, method: str, path: str, token: str) -> tuple[int, bytes]:
    """Send `path` verbatim: no client-side normalisation of `..` or `%2F`."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.request(method, path, headers={"Authorization": f"Bearer {token}",
                                            "Content-Length": "0"})
        r = conn.getresponse()
        return r.status, r.read(1 << 20)
    finally:
        conn.close()


def test_hostile_path_parameters_read_nothing(stack: Stack, owned: Owned, marker: Path,
                                              tenant_a: httpx.Client) -> None:
    spec: dict[str, Any] = tenant_a.get("/openapi.json").json()
    secret_a = tenant_a.headers["authorization"].split(" ", 1)[1]
    failures, tried = [], 0
    for path, item in spec["paths"].items():
        params = re.findall(r"\{([^}]+)\}", path)
        if not params:
            continue
        for method in (m.upper() for m in item if m in ("get", "post", "delete")):
            token = TOKEN if path.startswith("/v1/tokens") else secret_a
            good = valid_values(owned, path)
            for target in params:
                for bad in payloads(marker):
                    url = path
                    for p in params:
                        url = url.replace("{" + p + "}", bad if p == target else good[p])
                    status, body = raw_get(stack, method, url, token)
                    tried += 1
                    if status not in (404, 422) or SECRET.encode() in body:
                        failures.append(f"{method} {url[:120]}: {status} {body[:80]!r}")
    assert tried > 100
    assert not failures, f"{len(failures)} of {tried}:\n" + "\n".join(failures[:40])


def test_names_from_the_database_are_the_only_way_in(stack: Stack, owned: Owned,
                                                     tenant_a: httpx.Client) -> None:
    """The listed checkpoint downloads; the same file under any other spelling does not."""
    ok = tenant_a.get(f"/v1/jobs/{owned.train_job}/checkpoints/{owned.checkpoint}")
    assert ok.status_code == 200 and ok.content[:8] != b""
    for alias in (f"./{owned.checkpoint}", owned.checkpoint.upper(),
                  f"{owned.checkpoint}/", f"x/../{owned.checkpoint}"):
        status, _ = raw_get(stack, "GET", f"/v1/jobs/{owned.train_job}/checkpoints/"
                            f"{quote(alias, safe='')}", tenant_a.headers["authorization"][7:])
        assert status == 404, alias


@pytest.mark.parametrize("key", [
    "../x", "jobs/../../x", "/etc/passwd", "jobs/a/../../../x", "jobs\\..\\x", "jobs/a\x00b",
    "Jobs/A", "jobs//a", "jobs/a/", "", ".", "jobs/./a", "x" * 501, "jobs/%2e%2e/a",
])
def test_store_refuses_keys_it_would_never_build(tmp_path: Path, key: str) -> None:
    store = LocalStore(tmp_path / "root")
    (tmp_path / "x").write_text("outside")
    with pytest.raises(BadKey):
        check_key(key)
    with pytest.raises(BadKey):
        store.get_bytes(key)


def test_server_built_keys_pass(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    key = job_key("0123abcd", "checkpoints", "epoch-0001.safetensors")
    store.put_bytes(key, b"ok")
    assert store.get_bytes(key) == b"ok"
    with pytest.raises(BadKey):
        job_key("..", "x")


def test_static_files_stay_in_their_folder(stack: Stack, marker: Path) -> None:
    """The dashboard's /static mount (outside the OpenAPI spec) serves its folder only."""
    for path in ("/static/..%2F..%2Fapi%2Fapp.py", "/static/../../api/app.py",
                 "/static/%2e%2e/%2e%2e/api/app.py", "/static/..%5C..%5Capi%5Capp.py",
                 "/static/" + quote(str(ROOT / "api" / "app.py"), safe=""),
                 "/static/" + quote(str(marker), safe=""), "/static/%00"):
        status, body = raw_get(stack, "GET", path, "")
        assert status == 404, (path, status)
        assert b"create_app" not in body and SECRET.encode() not in body
