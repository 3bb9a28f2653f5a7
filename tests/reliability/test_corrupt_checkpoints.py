"""A damaged checkpoint is never trained on. A train job's worker is SIGKILLed once checkpoint k
exists; the newest checkpoint is then damaged on disk (1,000 flipped bytes in its tensor data,
or a broken header); the next attempt verifies size and sha256 of every file it resumes from,
skips the damaged one (saying so in the job's log), resumes from the newest intact one (or
starts over when none is) and ends with exactly the accuracy of a clean run of the same spec and
seed. Downloads send the digest of what they send; a feature-map job refuses a damaged source
checkpoint by name."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.reliability.infra import (
    api_without_workers,
    metric_epochs,
    slow_job,
    sync_url,
    wait_for,
)
from tests.services import Stack, wait_job

EPOCHS = 3


def train_job() -> dict[str, Any]:
    """slow_job's model on half its samples: epochs of about half a second, long enough to
    kill the worker between two checkpoints, short enough for three runs in a test."""
    job = slow_job(EPOCHS)
    job["dataset"]["samples"] = 4096
    return job


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_without_workers(Path(tmp_path_factory.mktemp("corrupt")), lease_seconds=3,
                             reconcile_interval_seconds=0.5) as s:
        s.start_worker("w0")
        yield s


@pytest.fixture(scope="module")
def clean(stack: Stack) -> dict[str, Any]:
    """The same spec and seed, never interrupted: the result a resumed run must equal."""
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=train_job()).json()["id"]
        done = wait_job(client, job_id, timeout=50)
    assert done["state"] == "succeeded", done["error"]
    assert done["result"]["resumed_from_epoch"] == 0
    return done


def live_worker(stack: Stack) -> Any:
    alive = [p for p in stack.workers if p.poll() is None]
    return alive[0] if alive else stack.start_worker(f"w{len(stack.workers)}")


def killed_after_checkpoint(stack: Stack, client: Any, k: int) -> str:
    """A train job whose worker was SIGKILLed right after checkpoint k was recorded (the job
    still `running`, epoch k + 1 under way)."""
    worker = live_worker(stack)
    job_id = client.post("/v1/jobs", json=train_job()).json()["id"]
    wait_for(lambda: len(client.get(f"/v1/jobs/{job_id}/checkpoints").json()) >= k,
             timeout=40, every=0.05, what=f"checkpoint {k} of {job_id}")
    Stack.kill(worker, signal.SIGKILL)
    assert len(client.get(f"/v1/jobs/{job_id}/checkpoints").json()) == k, \
        "the kill came after another epoch had ended"
    assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
    return job_id


def checkpoint_path(stack: Stack, job_id: str, name: str) -> Path:
    return Path(stack.env["CONVOY_HOME"]) / "artifacts" / "jobs" / job_id / "checkpoints" / name


def flip_tensor_bytes(path: Path, count: int = 1000) -> None:
    """XOR `count` bytes of the tensor data (after the header) with 0xFF."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - start > count + 100, "file too small to flip bytes in"
    for i in range(start + 100, start + 100 + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def break_header(path: Path) -> None:
    """Junk in the JSON header: not parseable as safetensors any more."""
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00{not json at all, broken header"[:32]
    path.write_bytes(bytes(data))


def logs_of(client: Any, job_id: str) -> list[str]:
    return [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]


def resumed_like_clean(client: Any, job_id: str, clean: dict[str, Any], *, start: int
                       ) -> dict[str, Any]:
    done = wait_job(client, job_id, timeout=50)
    assert done["state"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    assert done["result"]["resumed_from_epoch"] == start
    # resume is deterministic: the damaged epochs redone give exactly the clean run's model
    assert done["result"]["val_accuracy"] == clean["result"]["val_accuracy"]
    assert done["result"]["val_loss"] == pytest.approx(clean["result"]["val_loss"], rel=1e-5)
    for name, epochs in metric_epochs(client, job_id).items():
        assert epochs == list(range(1, EPOCHS + 1)), name  # one point per epoch
    listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    assert [c["epoch"] for c in listed] == list(range(1, EPOCHS + 1))
    for c in listed:  # the redone epochs' files replaced the damaged ones, rows updated
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/{c['name']}")
        assert hashlib.sha256(r.content).hexdigest() == c["sha256"] == r.headers["x-sha256"]
    return done


def test_flipped_bytes_in_the_newest_checkpoint_resume_from_the_newest_intact_one(stack, clean):
    with stack.client() as client:
        job_id = killed_after_checkpoint(stack, client, 2)
        path = checkpoint_path(stack, job_id, "epoch-0002.safetensors")
        flip_tensor_bytes(path)

        # the download is streamed: X-Sha256 is the digest recorded at write time, which the
        # damaged bytes sent no longer match, so the client can tell
        listed = {c["name"]: c for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()}
        r = client.get(f"/v1/jobs/{job_id}/checkpoints/epoch-0002.safetensors")
        assert r.status_code == 200
        assert r.headers["x-sha256"] == listed["epoch-0002.safetensors"]["sha256"]
        assert hashlib.sha256(r.content).hexdigest() != r.headers["x-sha256"]

        stack.start_worker(f"w{len(stack.workers)}")
        resumed_like_clean(client, job_id, clean, start=1)
        logs = logs_of(client, job_id)
        assert any("epoch-0002.safetensors: sha256 mismatch" in m
                   and "resuming from epoch-0001.safetensors" in m for m in logs), logs


def test_a_broken_header_in_the_newest_checkpoint_resumes_from_the_newest_intact_one(
        stack, clean):
    with stack.client() as client:
        job_id = killed_after_checkpoint(stack, client, 2)
        break_header(checkpoint_path(stack, job_id, "epoch-0002.safetensors"))
        stack.start_worker(f"w{len(stack.workers)}")
        resumed_like_clean(client, job_id, clean, start=1)
        logs = logs_of(client, job_id)
        assert any("epoch-0002.safetensors: sha256 mismatch" in m
                   and "resuming from epoch-0001.safetensors" in m for m in logs), logs


def test_with_no_intact_checkpoint_the_job_starts_over(stack, clean):
    """Epoch 2's header is broken and its row agrees with the broken bytes (the damage came
    before hashing: only parsing can tell); epoch 1's optimizer file has flipped bytes.
    Nothing is left to resume from, so the attempt starts over from epoch 0."""
    with stack.client() as client:
        job_id = killed_after_checkpoint(stack, client, 2)
        newest = checkpoint_path(stack, job_id, "epoch-0002.safetensors")
        break_header(newest)
        data = newest.read_bytes()
        with psycopg.connect(sync_url(stack.env["CONVOY_DATABASE_URL"])) as conn:
            conn.execute("UPDATE artifacts SET size = %s, sha256 = %s WHERE job_id = %s AND "
                         "name = 'epoch-0002.safetensors'",
                         (len(data), hashlib.sha256(data).hexdigest(), job_id))
        flip_tensor_bytes(checkpoint_path(stack, job_id, "epoch-0001.optimizer.safetensors"))
        stack.start_worker(f"w{len(stack.workers)}")
        resumed_like_clean(client, job_id, clean, start=0)
        logs = logs_of(client, job_id)
        assert any("epoch-0002.safetensors: unreadable (" in m
                   and "epoch-0001.optimizer.safetensors: sha256 mismatch" in m
                   and "no intact checkpoint left" in m and "starts over from epoch 0" in m
                   for m in logs), logs


def test_a_feature_map_job_refuses_a_damaged_source_checkpoint_by_name(stack, clean):
    live_worker(stack)
    with stack.client() as client:
        flip_tensor_bytes(checkpoint_path(stack, clean["id"], "epoch-0003.safetensors"))
        r = client.post("/v1/jobs", json={
            "kind": "feature_maps", "source": {"job_id": clean["id"]},
            "inputs": {"dataset": train_job()["dataset"], "indices": [0]}, "layers": None,
            "device": "cpu"})
        assert r.status_code == 201, r.text
        done = wait_job(client, r.json()["id"], timeout=40)
        assert done["state"] == "failed"
        assert "epoch-0003.safetensors" in done["error"], done["error"]
        assert "sha256 mismatch" in done["error"], done["error"]
