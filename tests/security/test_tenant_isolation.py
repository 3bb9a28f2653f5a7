"""Tenants: tenant B gets 404 (not 403: it must not learn that the id exists) on each of
tenant A's objects, while A itself gets 200 on the same URLs; B cannot use A's ids as inputs."""

from __future__ import annotations

import httpx
import pytest

from tests.factories import digits_cnn, train_request
from tests.security.conftest import Owned


def urls(o: Owned) -> list[tuple[str, str]]:
    j = o.train_job
    out = [
        ("GET", f"/v1/jobs/{j}"),
        ("GET", f"/v1/jobs/{j}/metrics"),
        ("GET", f"/v1/jobs/{j}/logs"),
        ("GET", f"/v1/jobs/{j}/checkpoints"),
        ("GET", f"/v1/jobs/{j}/checkpoints/{o.checkpoint}"),
        ("GET", f"/v1/jobs/{j}/checkpoints/last"),
        ("GET", f"/v1/jobs/{j}/events"),
        ("GET", f"/v1/datasets/{o.dataset}"),
    ]
    if o.feature_job:
        f = o.feature_job
        out += [("GET", f"/v1/jobs/{f}"),
                ("GET", f"/v1/jobs/{f}/feature-maps"),
                ("GET", f"/v1/jobs/{f}/feature-maps/{o.feature_layer}"),
                ("GET", f"/v1/jobs/{f}/feature-maps/{o.feature_layer}?format=png"),
                ("GET", f"/v1/jobs/{f}/feature-maps/0?format=json")]
    if o.invariance_job:
        out += [("GET", f"/v1/jobs/{o.invariance_job}"),
                ("GET", f"/v1/jobs/{o.invariance_job}/invariance")]
    if o.checkpoint_upload:
        out.append(("GET", f"/v1/checkpoints/{o.checkpoint_upload}"))
    if o.input_upload:
        out.append(("GET", f"/v1/inputs/{o.input_upload}"))
    return out


def test_other_tenants_objects_are_404(owned: Owned, tenant_a: httpx.Client,
                                       tenant_b: httpx.Client) -> None:
    failures = []
    for method, url in urls(owned):
        if url.endswith("/events"):  # a finished job's stream ends; B's must not start
            mine = tenant_a.request(method, url, timeout=30)
        else:
            mine = tenant_a.request(method, url)
        theirs = tenant_b.request(method, url)
        if mine.status_code != 200:
            failures.append(f"A {method} {url}: {mine.status_code} {mine.text[:100]}")
        if theirs.status_code != 404:
            failures.append(f"B {method} {url}: {theirs.status_code} {theirs.text[:100]}")
        # Nothing of A's may be in B's reply, not even the job's name or sizes.
        if owned.checkpoint in theirs.text or "tenant a" in theirs.text:
            failures.append(f"B {method} {url} echoes A's data: {theirs.text[:100]}")
    assert not failures, "\n".join(failures)


def test_other_tenant_cannot_cancel(owned: Owned, tenant_a: httpx.Client,
                                    tenant_b: httpx.Client) -> None:
    # A queued job of A's (a long one; canceled again right after) that B tries to cancel.
    r = tenant_a.post("/v1/jobs", json=train_request(200, model=digits_cnn(4)))
    assert r.status_code == 201
    job_id = r.json()["id"]
    try:
        assert tenant_b.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert tenant_a.get(f"/v1/jobs/{job_id}").json()["state"] in ("queued", "running")
    finally:
        assert tenant_a.post(f"/v1/jobs/{job_id}/cancel").status_code == 200


def test_lists_show_only_own_objects(owned: Owned, tenant_a: httpx.Client,
                                     tenant_b: httpx.Client) -> None:
    a_jobs = {j["id"] for j in tenant_a.get("/v1/jobs?limit=200").json()["items"]}
    b_jobs = {j["id"] for j in tenant_b.get("/v1/jobs?limit=200").json()["items"]}
    assert owned.train_job in a_jobs and owned.train_job not in b_jobs
    assert owned.dataset in {d["id"] for d in tenant_a.get("/v1/datasets").json()}
    assert owned.dataset not in {d["id"] for d in tenant_b.get("/v1/datasets").json()}
    for path, own in (("/v1/checkpoints", owned.checkpoint_upload),
                      ("/v1/inputs", owned.input_upload)):
        if own:
            assert own in {u["id"] for u in tenant_a.get(path).json()}
            assert own not in {u["id"] for u in tenant_b.get(path).json()}


def test_other_tenants_ids_are_not_usable_as_inputs(owned: Owned,
                                                    tenant_b: httpx.Client) -> None:
    """B cannot train on A's dataset nor extract feature maps from A's job or uploads."""
    r = tenant_b.post("/v1/jobs", json=train_request(1, dataset={"id": owned.dataset}))
    assert r.status_code == 422, r.text
    bodies = []
    if owned.feature_job:
        fm = {"kind": "feature_maps", "inputs": {"dataset": "digits", "indices": [0]},
              "device": "cpu"}
        bodies.append({**fm, "source": {"job_id": owned.train_job}})
        if owned.checkpoint_upload:
            bodies.append({**fm, "source": {"checkpoint_id": owned.checkpoint_upload}})
        if owned.input_upload:
            bodies.append({**fm, "source": {"job_id": owned.train_job},
                           "inputs": {"input_id": owned.input_upload}})
    if owned.invariance_job:  # the same source and inputs checks serve invariance jobs
        bodies += [{**body, "kind": "invariance", "transforms": {"translate": [1]}}
                   for body in list(bodies)]
    for body in bodies:
        r = tenant_b.post("/v1/jobs", json=body)
        assert r.status_code in (404, 422), (body, r.status_code, r.text)
    assert tenant_b.get("/v1/jobs?limit=200").json()["items"] == []


@pytest.mark.parametrize("header", ["X-Tenant", "X-Convoy-Tenant", "Tenant"])
def test_tenant_comes_from_the_token_only(owned: Owned, tenant_b: httpx.Client,
                                          header: str) -> None:
    r = tenant_b.get(f"/v1/jobs/{owned.train_job}", headers={header: "tenant-a"})
    assert r.status_code == 404
