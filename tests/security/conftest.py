"""Fixtures for the security tests: two tenants with their own tokens (made through the admin
API, as an operator would), and tenant A's objects for tenant B to try to reach."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest

from tests.factories import (
    checkpoint_upload,
    dataset_npz,
    dataset_upload,
    digits_cnn,
    feature_maps_request,
    inputs_upload,
    npy_bytes,
    train_request,
)
from tests.services import Stack, wait_job


def make_token(admin: httpx.Client, tenant: str, *, admin_token: bool = False) -> dict[str, Any]:
    r = admin.post("/v1/tokens", json={"tenant": tenant, "name": f"{tenant} tests",
                                       "admin": admin_token})
    assert r.status_code == 201, r.text
    return r.json()


@dataclass
class Owned:
    """What tenant A owns; ids are real, so a 404 for B can only come from the tenant check."""

    train_job: str
    dataset: str
    checkpoint: str  # name of a checkpoint of train_job
    feature_job: str | None = None
    feature_layer: str | None = None
    invariance_job: str | None = None
    checkpoint_upload: str | None = None
    input_upload: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="session")
def tenant_a(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as admin:
        secret = make_token(admin, "tenant-a")["token"]
    with stack.client(secret) as c:
        yield c


@pytest.fixture(scope="session")
def tenant_b(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as admin:
        secret = make_token(admin, "tenant-b")["token"]
    with stack.client(secret) as c:
        yield c


def _paths(client: httpx.Client) -> set[str]:
    return set(client.get("/openapi.json").json()["paths"])


@pytest.fixture(scope="session")
def owned(tenant_a: httpx.Client) -> Owned:
    """A train job (1 epoch), an uploaded dataset, and where the routes exist a feature-map
    job, an uploaded checkpoint and uploaded inputs, all tenant A's."""
    paths = _paths(tenant_a)
    r = tenant_a.post("/v1/jobs", json=train_request(1, model=digits_cnn(4)))
    assert r.status_code == 201, r.text
    job = wait_job(tenant_a, r.json()["id"])
    assert job["state"] == "succeeded", job
    ckpts = tenant_a.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    assert ckpts, "the train job left no checkpoint"
    r = tenant_a.post("/v1/datasets", **dataset_upload(dataset_npz(), filename="a.npz",
                                                       name="tenant a's"))
    assert r.status_code == 201, r.text
    owned = Owned(train_job=job["id"], dataset=r.json()["id"], checkpoint=ckpts[0]["name"])

    if "/v1/jobs/{job_id}/feature-maps" in paths:
        r = tenant_a.post("/v1/jobs", json=feature_maps_request({"job_id": owned.train_job},
                                                                layers=None))
        assert r.status_code == 201, r.text
        fjob = wait_job(tenant_a, r.json()["id"])
        assert fjob["state"] == "succeeded", fjob
        layers = tenant_a.get(f"/v1/jobs/{fjob['id']}/feature-maps").json()["layers"]
        owned.feature_job, owned.feature_layer = fjob["id"], layers[0]["name"]
    if "/v1/jobs/{job_id}/invariance" in paths:
        r = tenant_a.post("/v1/jobs", json={
            "kind": "invariance", "source": {"job_id": owned.train_job},
            "inputs": {"dataset": "digits", "indices": [0, 1]}, "transforms": {"rotate": [90]}})
        assert r.status_code == 201, r.text
        ijob = wait_job(tenant_a, r.json()["id"])
        assert ijob["state"] == "succeeded", ijob
        owned.invariance_job = ijob["id"]
    if "/v1/checkpoints" in paths:
        blob = tenant_a.get(f"/v1/jobs/{owned.train_job}/checkpoints/{owned.checkpoint}")
        assert blob.status_code == 200
        r = tenant_a.post("/v1/checkpoints", **checkpoint_upload(
            blob.content, digits_cnn(4), filename="a.safetensors"))
        assert r.status_code == 201, r.text
        owned.checkpoint_upload = r.json()["id"]
    if "/v1/inputs" in paths:
        r = tenant_a.post("/v1/inputs", **inputs_upload(
            npy_bytes(np.zeros((2, 1, 8, 8), dtype=np.float32)), filename="a.npy"))
        assert r.status_code == 201, r.text
        owned.input_upload = r.json()["id"]
    return owned


@pytest.fixture(scope="session")
def bare_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An API with no worker on its own database and queue: submitted jobs stay queued, so
    queue limits can be reached and a fuzzer can submit anything without running it."""
    from pathlib import Path

    from tests.services import api_alone, create_pg_database, drop_pg_database

    home = Path(tmp_path_factory.mktemp("bare-api"))
    url = create_pg_database()
    try:
        with api_alone(home, database_url=url, queue_prefix="convoy-bare",
                       CONVOY_MAX_QUEUED_PER_TENANT="3",
                       # the reconciler must not spend the test resending what nobody consumes
                       CONVOY_REQUEUE_AFTER_SECONDS="3600") as s:
            yield s
    finally:
        drop_pg_database(url)
