"""Many hosts, one bucket: the API and two workers, each with a CONVOY_HOME of its own and no
shared artifact folder, share PostgreSQL, Redis and one S3 bucket (SeaweedFS). A training job
starts on worker A; A is SIGKILLed mid-epoch; worker B resumes it from the checkpoint A wrote
to the bucket; a feature-map job on B reads A's checkpoint; every artifact downloads through
the API with its listed sha256."""

from __future__ import annotations

import hashlib
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.infra import api_without_workers, attempts, slow_job, wait_for
from tests.s3server import WeedServer
from tests.services import (
    REDIS,
    Stack,
    wait_job,
)
from tests.storage.conftest import s3_env

EPOCHS = 3


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, weed: WeedServer) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("multi-host")) / "api-host"
    home.mkdir()
    with api_without_workers(home, s3_env(weed), lease_seconds=3,
                             reconcile_interval_seconds=0.5) as stack:
        assert stack.env["CONVOY_BROKER_URL"].startswith(REDIS)
        yield stack


def start_host_worker(stack: Stack, name: str) -> None:
    """A worker on a 'host' of its own: its own CONVOY_HOME, the same three URLs."""
    home = stack.home.parent / f"host-{name}"
    home.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool", "solo",
           "-Q", stack.env["CONVOY_QUEUE"], "--without-gossip", "--without-mingle",
           "--without-heartbeat", "-n", f"{name}@%h", "--loglevel", "INFO"]
    proc = stack._spawn(cmd, name, {"CONVOY_HOME": str(home), "CONVOY_WORKER_ID": name})
    stack.workers.append(proc)
    stack.wait_worker_ready(name)


def verify_downloads(client, job_id: str, weed: WeedServer, stack: Stack) -> int:  # type: ignore[no-untyped-def]
    count = 0
    for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json():
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/{c['name']}")
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == c["sha256"] == r.headers["x-sha256"]
        assert len(r.content) == c["size"]
        count += 1
    return count


def test_worker_b_resumes_from_worker_a_checkpoint_through_the_bucket(hosts: Stack,
                                                                     weed: WeedServer) -> None:
    stack = hosts
    db = stack.env["CONVOY_DATABASE_URL"]
    prefix = stack.env["CONVOY_ARTIFACT_ROOT"].split("/", 3)[3]
    start_host_worker(stack, "host-a")
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_job(EPOCHS)).json()["id"]

        def first_epoch() -> float | None:
            points = client.get(f"/v1/jobs/{job_id}/metrics").json()["series"].get(
                "images_per_second", [])
            return 6553 / points[0]["value"] if points else None

        epoch_s = wait_for(first_epoch, timeout=120, what=f"epoch 1 of {job_id}")
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}/checkpoints").json(), timeout=30)
        time.sleep(0.3 * epoch_s)  # into epoch 2
        Stack.kill(stack.workers[0], signal.SIGKILL)
        at_kill = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert [c["name"] for c in at_kill] == ["epoch-0001.safetensors"]
        # A's checkpoint is in the bucket, not on any host's disk
        assert f"{prefix}/jobs/{job_id}/checkpoints/epoch-0001.safetensors" in weed.keys(
            prefix=prefix)

        start_host_worker(stack, "host-b")
        done = wait_job(client, job_id, timeout=180)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempt"] == 2
        assert [(a, w) for a, w, *_ in attempts(db, job_id)] == [(1, "host-a"), (2, "host-b")]
        assert done["result"]["resumed_from_epoch"] == 1
        logs = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]
        assert any("attempt 2 resumes from epoch-0001.safetensors (epoch 1)" in m
                   for m in logs), logs
        assert verify_downloads(client, job_id, weed, stack) == EPOCHS

        # a feature-map job on B reads the checkpoint A wrote
        fm = client.post("/v1/jobs", json={
            "kind": "feature_maps", "device": "cpu",
            "source": {"job_id": job_id, "checkpoint": "epoch-0001.safetensors"},
            "inputs": {"dataset": {"name": "synthetic", "samples": 8192, "size": 16,
                                   "channels": 3, "num_classes": 4}, "indices": [0, 1]},
            "png": False})
        assert fm.status_code == 201, fm.text
        fm_done = wait_job(client, fm.json()["id"], timeout=120)
        assert fm_done["state"] == "succeeded", fm_done["error"]
        assert [w for _, w, *_ in attempts(db, fm_done["id"])] == ["host-b"]
        layers = client.get(f"/v1/jobs/{fm_done['id']}/feature-maps").json()["layers"]
        assert layers
        for layer in layers:
            r = client.get(f"/v1/jobs/{fm_done['id']}/feature-maps/{layer['name']}")
            assert r.status_code == 200
            assert hashlib.sha256(r.content).hexdigest() == layer["sha256"] == \
                r.headers["x-sha256"]
            assert len(r.content) == layer["file_bytes"]

    # nothing on any host's disk: every artifact lives in the bucket
    for home in stack.home.parent.iterdir():
        assert not (home / "artifacts").exists(), home
