"""Stacks on the S3 store (SeaweedFS) and on the local folder, and artifacts planted in them
(an object written into the store plus its row, through db/ functions)."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from convoy.artifacts import ArtifactStore, checkpoint_name, job_key, open_store
from db import artifacts
from db.session import session_scope
from db.tables import Artifact, Job
from tests.factories import feature_maps_request, train_request
from tests.s3server import WeedServer
from tests.services import REDIS, Stack, stack_env


def s3_env(weed: WeedServer) -> dict[str, str]:
    """A fresh prefix in the test bucket, with the server's endpoint and credentials."""
    return weed.env(f"stack-{uuid.uuid4().hex[:8]}")


def make_stack(home: Path, pg_url: str, **extra: str) -> Stack:
    env = stack_env(home, database_url=pg_url, broker_url=f"{REDIS}/0",
                    queue=f"convoy-s3-{uuid.uuid4().hex[:8]}", **extra)
    return Stack(env=env, home=home)


def store_of(stack: Stack) -> ArtifactStore:
    """The stack's store, opened here as its processes open it."""
    env = stack.env
    names = [k for k in env if k.startswith("AWS_") or k == "CONVOY_S3_ENDPOINT_URL"]
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: env[k] for k in names})
    try:
        root = env.get("CONVOY_ARTIFACT_ROOT") or str(stack.home / "artifacts")
        return open_store(root)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module", params=["local", "s3"])
def api_only(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
             pg_url: str) -> Iterator[Stack]:
    """The API alone (no worker: submitted jobs stay queued) on the local folder or S3."""
    extra = s3_env(request.getfixturevalue("weed")) if request.param == "s3" else {}
    stack = make_stack(tmp_path_factory.mktemp(f"api-{request.param}"), pg_url, **extra)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop()


@dataclass
class Planted:
    job_id: str
    name: str
    key: str
    size: int
    sha256: str


def plant(stack: Stack, chunks: Iterable[bytes], *, epoch: int = 1) -> Planted:
    """A queued train job with a checkpoint row whose object holds `chunks`."""
    with stack.client() as client:
        r = client.post("/v1/jobs", json=train_request(1))
        assert r.status_code == 201, r.text
        job = r.json()
    name = checkpoint_name(epoch)
    key = job_key(job["id"], "checkpoints", name)
    size, sha = store_of(stack).write(key, chunks)
    with session_scope(stack.env["CONVOY_DATABASE_URL"]) as session:
        row = session.get(Job, job["id"])
        assert row is not None
        artifacts.put_rows(session, [Artifact(
            job_id=job["id"], tenant=row.tenant, kind="checkpoint",
            name=name, key=key, size=size, sha256=sha, meta={"epoch": epoch})])
        session.commit()
    return Planted(job["id"], name, key, size, sha)


ONE_CONV = {"model": {"input_shape": [1, 8, 8], "layers": [
    {"type": "conv2d", "out_channels": 3, "kernel_size": 3}]}, "seed": 0}


def plant_feature_map(stack: Stack, data: bytes | Iterable[bytes], shape: Sequence[int], *,
                      source: dict[str, Any] = ONE_CONV,
                      inputs: dict[str, Any] | None = None) -> Planted:
    """A queued feature-map job of `source` with a float32 map of `shape` for its layer
    `0-conv2d`: the object holds `data` (the whole .npy: bytes written as they are, or chunks
    streamed), its row the map's meta."""
    with stack.client() as client:
        r = client.post("/v1/jobs", json=feature_maps_request(source, inputs=inputs))
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
    key = job_key(job_id, "feature-maps", "0-conv2d.npy")
    store = store_of(stack)
    size, sha = store.put_bytes(key, data) if isinstance(data, bytes) else store.write(key, data)
    with session_scope(stack.env["CONVOY_DATABASE_URL"]) as session:
        row = session.get(Job, job_id)
        assert row is not None
        artifacts.put_rows(session, [Artifact(
            job_id=job_id, tenant=row.tenant, kind="feature_map", name="0-conv2d", key=key,
            size=size, sha256=sha, meta={"index": 0, "type": "conv2d", "shape": list(shape),
                                         "dtype": "float32", "bytes": 4 * math.prod(shape)})])
        session.commit()
    return Planted(job_id, "0-conv2d", key, size, sha)
