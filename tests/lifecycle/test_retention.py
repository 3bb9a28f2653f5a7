"""Checkpoint retention through the real stack: a 10-epoch job keeps exactly the union the
rule gives (the `keep_last` newest and the `keep_best` best by its recorded metric), the
store holds no other checkpoint file, and only the newest keep optimizer state; a worker
killed between a committed decision and its deletes leaves every listed checkpoint intact,
and the next attempt resumes from them and sweeps the leftovers."""

from __future__ import annotations

import hashlib
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories import train_request
from tests.reliability.infra import api_without_workers, wait_for
from tests.services import Stack, wait_job

PRUNE_DELAY = 1.5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_without_workers(Path(tmp_path_factory.mktemp("retention")), lease_seconds=3,
                             reconcile_interval_seconds=0.5,
                             checkpoint_prune_delay_seconds=PRUNE_DELAY) as s:
        s.start_worker("w0")
        yield s


def stored(stack: Stack, job_id: str) -> set[str]:
    folder = Path(stack.env["CONVOY_HOME"]) / "artifacts" / "jobs" / job_id / "checkpoints"
    return {p.name for p in folder.iterdir() if not p.name.startswith(".tmp-")} \
        if folder.is_dir() else set()


def expected_kept(values: dict[int, float], keep_last: int, keep_best: int, mode: str
                  ) -> set[int]:
    """The rule, written out again here: the newest epochs and the best ones."""
    epochs = sorted(values)
    newest = set(epochs[-keep_last:])
    ranked = sorted(epochs, key=lambda e: (-values[e] if mode == "max" else values[e], -e))
    return newest | set(ranked[:keep_best])


def name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.safetensors"


@pytest.mark.parametrize("metric,mode", [("val_accuracy", "max"), ("val_loss", "min")])
def test_ten_epochs_keep_exactly_the_union(stack: Stack, metric: str, mode: str) -> None:
    body = train_request(10, lr=0.5 if mode == "max" else 0.8)
    body["checkpoints"] = {"keep_last": 2, "keep_best": 1, "metric": metric, "mode": mode}
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        done = wait_job(client, job_id, timeout=120)
        assert done["state"] == "succeeded", done["error"]
        series = client.get(f"/v1/jobs/{job_id}/metrics?name={metric}").json()["series"][metric]
        values = {p["epoch"]: p["value"] for p in series}
        assert sorted(values) == list(range(1, 11))
        want = expected_kept(values, 2, 1, mode)
        listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert {c["name"] for c in listed} == {name(e) for e in want}
        assert 2 <= len(listed) <= 3
        # the deletes run after the last epoch's commit, off the training thread
        files = {name(e) for e in want} | {name(e).replace(".safetensors",
                                                            ".optimizer.safetensors")
                                           for e in (9, 10)}
        wait_for(lambda: stored(stack, job_id) == files, timeout=10,
                 what=f"only the kept files in the store (have {stored(stack, job_id)})")
        for c in listed:  # every listed one downloads whole
            blob = client.get(f"/v1/jobs/{job_id}/checkpoints/{c['name']}")
            assert blob.status_code == 200
            assert hashlib.sha256(blob.content).hexdigest() == c["sha256"]


def test_keep_last_null_keeps_every_checkpoint(stack: Stack) -> None:
    body = train_request(4)
    body["checkpoints"] = {"keep_last": None}
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=body).json()["id"]
        assert wait_job(client, job_id, timeout=60)["state"] == "succeeded"
        listed = [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()]
        assert listed == [name(e) for e in range(1, 5)]
        assert len(stored(stack, job_id)) == 8


def test_bad_policy_is_a_422_naming_the_field(stack: Stack) -> None:
    with stack.client() as client:
        for bad in ({"keep_last": 0}, {"keep_best": -1}, {"metric": "lr"}, {"mode": "up"},
                    {"keep_last": "two"}, {"unknown": 1}):
            body = train_request(1)
            body["checkpoints"] = bad
            r = client.post("/v1/jobs", json=body)
            assert r.status_code == 422, (bad, r.text)
            assert "checkpoints" in r.text


def test_killed_between_decision_and_deletes_resumes_intact(stack: Stack) -> None:
    body: dict[str, Any] = train_request(6)
    body["checkpoints"] = {"keep_last": 1, "keep_best": 0}
    with stack.client() as client:
        worker = next(p for p in stack.workers if p.poll() is None)
        job_id = client.post("/v1/jobs", json=body).json()["id"]

        def in_window() -> bool:
            # epoch 2's decision is committed (epoch 1 no longer listed) and its file is
            # still in the store: the worker sleeps PRUNE_DELAY before deleting it
            listed = [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()]
            return listed == [name(2)] and name(1) in stored(stack, job_id)

        wait_for(in_window, timeout=60, every=0.05, what="epoch 2 decided, not yet deleted")
        Stack.kill(worker, signal.SIGKILL)
        listed = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert [c["name"] for c in listed] == [name(2)]
        for c in listed:  # the listed checkpoint is whole
            blob = client.get(f"/v1/jobs/{job_id}/checkpoints/{c['name']}")
            assert hashlib.sha256(blob.content).hexdigest() == c["sha256"]
        stack.start_worker("w1")
        done = wait_job(client, job_id, timeout=90)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["resumed_from_epoch"] >= 2
        assert [c["name"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json()] \
            == [name(6)]
        wait_for(lambda: stored(stack, job_id) == {name(6), name(6).replace(
            ".safetensors", ".optimizer.safetensors")}, timeout=10,
            what=f"leftovers swept (have {stored(stack, job_id)})")
