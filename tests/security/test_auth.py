"""Authentication: every operation in the live OpenAPI spec refuses a missing, wrong or
revoked token with 401; only liveness, readiness and the docs are open; only admins manage
tokens. The routes come from /openapi.json, so a new endpoint is covered the day it lands."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from tests.security.conftest import make_token
from tests.services import Stack

PUBLIC = {"/healthz", "/readyz"}
DOCS = ["/docs", "/openapi.json", "/redoc"]


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method.upper(), path, op) for path, item in spec["paths"].items()
            for method, op in item.items() if method in ("get", "post", "put", "patch", "delete")]


def request_for(method: str, path: str, op: dict[str, Any]) -> dict[str, Any]:
    """A request that would otherwise pass the body checks that run before auth (type, size)."""
    url = re.sub(r"\{[^}]+\}", "0" * 32, path)
    content = (op.get("requestBody") or {}).get("content", {})
    if "multipart/form-data" in content:
        return {"method": method, "url": url, "files": {"file": ("x.bin", b"x")}}
    if "application/json" in content:
        return {"method": method, "url": url, "json": {}}
    return {"method": method, "url": url}


@pytest.fixture(scope="module")
def spec(stack: Stack) -> dict[str, Any]:
    return httpx.get(stack.url + "/openapi.json", timeout=30).json()


@pytest.fixture(scope="module")
def revoked_secret(client: httpx.Client) -> str:
    made = make_token(client, "tenant-revoked")
    assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {made['token']}"}
                      ).status_code == 200
    r = client.delete(f"/v1/tokens/{made['id']}")
    assert r.status_code == 200 and r.json()["revoked_at"], r.text
    return made["token"]


@pytest.fixture(scope="module")
def client(stack: Stack):  # type: ignore[no-untyped-def]
    with stack.client() as c:
        yield c


def test_every_operation_needs_a_valid_token(stack: Stack, spec: dict[str, Any],
                                             revoked_secret: str) -> None:
    ops = [o for o in operations(spec) if o[1] not in PUBLIC]
    assert len(ops) >= 12, "the spec lost its routes?"
    bad_headers = {
        "no token": {},
        "wrong token": {"Authorization": "Bearer cvy_not-a-real-token"},
        "revoked token": {"Authorization": f"Bearer {revoked_secret}"},
        "wrong scheme": {"Authorization": f"Basic {revoked_secret}"},
        "empty bearer": {"Authorization": "Bearer"},
        "huge token": {"Authorization": "Bearer " + "x" * 4000},
    }
    failures = []
    with httpx.Client(base_url=stack.url, timeout=30) as anon:
        for method, path, op in ops:
            for what, headers in bad_headers.items():
                r = anon.request(**request_for(method, path, op), headers=headers)
                if r.status_code != 401 or r.headers.get("www-authenticate") != "Bearer":
                    failures.append(f"{method} {path} with {what}: {r.status_code} {r.text[:80]}")
    assert not failures, "\n".join(failures)


def test_health_and_docs_need_no_token(stack: Stack) -> None:
    with httpx.Client(base_url=stack.url, timeout=30) as anon:
        for path in [*PUBLIC, *DOCS]:
            r = anon.get(path)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])


def test_public_routes_leak_no_tenant_data(stack: Stack) -> None:
    """The open routes say whether the service is up, nothing about anyone's jobs."""
    with httpx.Client(base_url=stack.url, timeout=30) as anon:
        for path in PUBLIC:
            assert set(anon.get(path).json()) <= {"status", "checks"}


def test_token_admin_needs_an_admin(stack: Stack, client: httpx.Client) -> None:
    user = make_token(client, "tenant-plain")
    with stack.client(user["token"]) as c:
        assert c.get("/v1/jobs").status_code == 200
        assert c.get("/v1/tokens").status_code == 403
        assert c.post("/v1/tokens", json={"tenant": "mine", "admin": True}).status_code == 403
        assert c.delete(f"/v1/tokens/{user['id']}").status_code == 403
    listed = client.get("/v1/tokens").json()
    mine = next(t for t in listed if t["id"] == user["id"])
    # The secret is shown once, at creation; the list never carries it nor its hash.
    assert mine["token"] is None and "token_hash" not in mine
    assert user["token"] not in client.get("/v1/tokens").text


@pytest.mark.parametrize("tenant", ["", "a/b", "../x", "x" * 65, "a b", "ä", "a\u0000"])
def test_bad_tenant_names_are_422(client: httpx.Client, tenant: str) -> None:
    r = client.post("/v1/tokens", json={"tenant": tenant})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"][-1] == "tenant"


def test_revoking_is_idempotent_and_unknown_ids_are_404(client: httpx.Client) -> None:
    made = make_token(client, "tenant-twice")
    assert client.delete(f"/v1/tokens/{made['id']}").status_code == 200
    assert client.delete(f"/v1/tokens/{made['id']}").status_code == 200
    assert client.delete("/v1/tokens/" + "f" * 32).status_code == 404


def test_a_token_that_revokes_itself_is_told_so(stack: Stack, client: httpx.Client) -> None:
    """Self-revocation stays allowed (for an admin token that is not the last one), but the
    answer says the caller's own token was revoked, and that token is refused from then on.
    Revoking another token says revoked_self false."""
    other = make_token(client, "tenant-self-other")
    made = make_token(client, "tenant-self", admin_token=True)
    with stack.client(made["token"]) as own:
        r = own.delete(f"/v1/tokens/{other['id']}")
        assert r.status_code == 200, r.text
        assert r.json()["revoked_self"] is False
        assert r.json()["message"] == f"token {other['id']} revoked"
        r = own.delete(f"/v1/tokens/{made['id']}")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == made["id"] and body["revoked_at"], body
        assert body["revoked_self"] is True
        assert "the token this request was made with" in body["message"], body
        assert "token" not in body or body["token"] is None  # never the secret again
        r = own.get("/v1/jobs")
        assert r.status_code == 401, r.text
    # an admin revoking it again is told it is not its own
    r = client.delete(f"/v1/tokens/{made['id']}")
    assert r.status_code == 200 and r.json()["revoked_self"] is False, r.text


def test_production_api_refuses_to_start_without_a_bootstrap_token(tmp_path):
    """No secret minted into a container log: `convoy api` in production exits at start-up,
    naming the variable; the same settings are fine for a worker (compose test runs one)."""
    import os
    import subprocess
    import sys

    from tests.services import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVOY_")}
    env.update(CONVOY_ENV="production", CONVOY_HOME=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "api", "--migrate", "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "CONVOY_BOOTSTRAP_TOKEN must be set" in proc.stderr
    assert not (tmp_path / "admin-token").exists()
