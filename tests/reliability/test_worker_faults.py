"""A worker killed mid-epoch, and cancel: a short lease (3 s) and a fast reconciler, so a
lost worker's job is requeued within seconds and resumed from its last checkpoint."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.infra import (
    api_without_workers,
    attempts,
    metric_epochs,
    slow_job,
    tiny_job,
    wait_for,
)
from tests.services import Stack, wait_job

EPOCHS = 3


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_without_workers(Path(tmp_path_factory.mktemp("faults")), lease_seconds=3,
                             reconcile_interval_seconds=0.5) as stack:
        stack.start_worker("w0")
        yield stack


def live_worker(stack: Stack) -> None:
    if not any(p.poll() is None for p in stack.workers):
        stack.start_worker(f"w{len(stack.workers)}")


def first_epoch_done(client, job_id: str) -> float:  # type: ignore[no-untyped-def]
    """Waits for epoch 1's checkpoint row; returns that epoch's training time in seconds."""
    def seen() -> float | None:
        series = client.get(f"/v1/jobs/{job_id}/metrics").json()["series"]
        points = series.get("images_per_second", [])
        return 6553 / points[0]["value"] if points else None

    return wait_for(seen, timeout=120, what=f"epoch 1 of {job_id}")


def test_sigkilled_worker_mid_epoch_2_is_resumed_from_its_checkpoint_by_another(faults):
    env_url = faults.env["CONVOY_DATABASE_URL"]
    with faults.client() as client:
        job_id = client.post("/v1/jobs", json=slow_job(EPOCHS)).json()["id"]
        epoch_s = first_epoch_done(client, job_id)
        time.sleep(0.3 * epoch_s)  # into epoch 2, well before its end
        w0 = faults.workers[0]
        Stack.kill(w0, signal.SIGKILL)
        checkpoints_at_kill = len(client.get(f"/v1/jobs/{job_id}/checkpoints").json())
        assert checkpoints_at_kill == 1, "the kill came after epoch 2 had ended"
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"

        faults.start_worker("w1")
        done = wait_job(client, job_id, timeout=120)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempt"] == 2
        assert done["result"]["resumed_from_epoch"] == 1
        assert done["result"]["epochs_done"] == EPOCHS

        # One point per epoch for every series: epoch 2's lost half left nothing behind.
        for name, epochs in metric_epochs(client, job_id).items():
            assert epochs == list(range(1, EPOCHS + 1)), name
        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert [c["epoch"] for c in checkpoints] == list(range(1, EPOCHS + 1))

        logs = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]
        assert any("lease of worker w0 expired on attempt 1" in m for m in logs), logs
        assert any("attempt 2 resumes from epoch-0001.safetensors (epoch 1)" in m
                   for m in logs), logs

    history = attempts(env_url, job_id)
    assert [(a, w, o) for a, w, _, _, o in history] == [
        (1, "w0", "lease_expired"), (2, "w1", "succeeded")]
    assert history[0][3] <= history[1][2], "attempt 2 began before attempt 1's lease ended"


def test_a_sigkilled_invariance_job_is_taken_back_and_measured_again_by_another(faults):
    """Invariance jobs hold a lease like the other kinds: their worker SIGKILLed mid-run,
    the lease expires, and another worker measures the job from the start."""
    live_worker(faults)
    env_url = faults.env["CONVOY_DATABASE_URL"]
    request = {"kind": "invariance", "device": "cpu",
               "source": {"model": {"input_shape": [1, 8, 8], "layers": [
                   {"type": "conv2d", "out_channels": 32, "kernel_size": 3, "padding": 1},
                   {"type": "relu"}, {"type": "conv2d", "out_channels": 32, "kernel_size": 3,
                                      "padding": 1},
                   {"type": "flatten"}, {"type": "linear", "out_features": 10}]}, "seed": 0},
               "inputs": {"dataset": "digits", "split": "all", "indices": list(range(1797))},
               "transforms": {"translate": [1, 2, 3, 4, 5, 6, 7],
                              "rotate": [float(k) for k in range(5, 181, 6)],
                              "scale": [0.5 + k / 16 for k in range(32)]}}
    with faults.client() as client:
        r = client.post("/v1/jobs", json=request)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(lambda: (client.get(f"/v1/jobs/{job_id}").json()["progress"] or 0) > 0.02
                 or None, timeout=120, what=f"progress of {job_id}")
        running = [w for w in faults.workers if w.poll() is None]
        assert len(running) == 1
        Stack.kill(running[0], signal.SIGKILL)
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "running"
        faults.start_worker(f"w{len(faults.workers)}")
        done = wait_job(client, job_id, timeout=300)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempt"] == 2
        curves = client.get(f"/v1/jobs/{job_id}/invariance").json()
        assert len(curves["layers"]) == 5
        assert len(curves["layers"][0]["curves"]["rotate"]) == 30
    outcomes = [o for _, _, _, _, o in attempts(env_url, job_id)]
    assert outcomes == ["lease_expired", "succeeded"]


def test_cancel_running_stops_the_worker_within_5s_and_keeps_its_checkpoint(faults):
    live_worker(faults)
    env_url = faults.env["CONVOY_DATABASE_URL"]
    with faults.client() as client:
        running = client.post("/v1/jobs", json=slow_job(20)).json()["id"]
        waiting = client.post("/v1/jobs", json=slow_job(2)).json()["id"]
        first_epoch_done(client, running)

        # queued behind the busy worker: canceled at once, never claimed
        r = client.post(f"/v1/jobs/{waiting}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "canceled"

        asked = time.monotonic()
        r = client.post(f"/v1/jobs/{running}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "canceled"
        ended = wait_for(lambda: [a for a in attempts(env_url, running) if a[3] is not None],
                         timeout=30, every=0.05, what="the worker to stop")
        stopped_after = time.monotonic() - asked
        assert stopped_after < 5, f"worker stopped {stopped_after:.1f}s after the cancel"
        assert ended[0][4] == "canceled"

        job = client.get(f"/v1/jobs/{running}").json()
        assert job["state"] == "canceled" and job["finished_at"]
        kept = client.get(f"/v1/jobs/{running}/checkpoints").json()
        assert kept and kept[0]["epoch"] == 1
        assert client.get(f"/v1/jobs/{running}/checkpoints/last").status_code == 200

        # the canceled queued job's message reaches the now idle worker and is a no-op
        probe = client.post("/v1/jobs", json=tiny_job()).json()["id"]
        assert wait_job(client, probe)["state"] == "succeeded"
        assert attempts(env_url, waiting) == []
        assert client.get(f"/v1/jobs/{waiting}").json()["state"] == "canceled"

        for job_id in (running, waiting, probe):
            r = client.post(f"/v1/jobs/{job_id}/cancel")
            assert r.status_code == 409, r.text
            assert "already" in r.json()["detail"]


def test_warm_shutdown_hands_the_job_back_and_another_worker_resumes_it(faults):
    """SIGTERM (docker stop, Ctrl-C): the worker stops the job between steps, puts it back in
    the queue at once (no lease to wait out) without using up an attempt, and exits; the
    next worker resumes it from its last checkpoint."""
    live_worker(faults)
    env_url = faults.env["CONVOY_DATABASE_URL"]
    with faults.client() as client:
        submitted = client.post("/v1/jobs", json=slow_job(EPOCHS)).json()
        job_id = submitted["id"]
        epoch_s = first_epoch_done(client, job_id)
        time.sleep(0.3 * epoch_s)  # into epoch 2
        worker = next(p for p in faults.workers if p.poll() is None)
        asked = time.monotonic()
        Stack.kill(worker, signal.SIGTERM)  # waits for the process to exit
        exited_after = time.monotonic() - asked
        assert worker.returncode == 0
        assert exited_after < 5, f"warm shutdown took {exited_after:.1f}s"
        queued = client.get(f"/v1/jobs/{job_id}").json()
        assert queued["state"] == "queued", queued
        assert queued["attempt"] == 2  # the failure budget is unchanged:
        assert queued["max_attempts"] == submitted["max_attempts"] + 1

        faults.start_worker(f"w{len(faults.workers)}")
        done = wait_job(client, job_id, timeout=120)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["resumed_from_epoch"] >= 1
        for name, epochs in metric_epochs(client, job_id).items():
            assert epochs == list(range(1, EPOCHS + 1)), name
        logs = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]
        assert any("shut down: job handed back" in m for m in logs), logs

    outcomes = [o for _, _, _, _, o in attempts(env_url, job_id)]
    assert outcomes == ["released", "succeeded"]


def cadence_job(epochs: int, every: dict[str, float]) -> dict[str, Any]:
    """slow_job with shorter epochs (a quarter of the images), every checkpoint kept, and a
    checkpoint cadence of its own."""
    job = slow_job(epochs)
    job["dataset"]["samples"] = 2048
    job["checkpoints"] = {"keep_last": None}
    job["checkpoint_every"] = every
    return job


def checkpoint_epochs(client, job_id: str) -> list[int]:  # type: ignore[no-untyped-def]
    return sorted(c["epoch"] for c in client.get(f"/v1/jobs/{job_id}/checkpoints").json())


def test_a_job_with_min_seconds_cadence_resumes_after_sigkill_from_its_last_checkpoint(faults):
    """checkpoint_every {epochs: 2, min_seconds}: the epochs in between record metrics but
    no checkpoint. SIGKILLed after its first checkpoint and a later epoch, the job resumes
    from the last checkpoint written before the kill (not its last finished epoch), and its
    last epoch is checkpointed whatever the cadence."""
    live_worker(faults)
    epochs = 9
    with faults.client() as client:
        job_id = client.post("/v1/jobs", json=cadence_job(
            epochs, {"epochs": 2, "min_seconds": 0.5})).json()["id"]

        def past_a_checkpoint() -> bool | None:
            written = checkpoint_epochs(client, job_id)
            recorded = metric_epochs(client, job_id).get("val_loss", [])
            return bool(written and recorded and max(recorded) > written[-1]) or None

        wait_for(past_a_checkpoint, timeout=120, what=f"an epoch after a checkpoint of {job_id}")
        worker = next(p for p in faults.workers if p.poll() is None)
        Stack.kill(worker, signal.SIGKILL)
        written = checkpoint_epochs(client, job_id)
        recorded = metric_epochs(client, job_id)["val_loss"]
        assert written and written[0] >= 2, written  # epoch 1 is never due (epochs: 2)
        assert all(b - a >= 2 for a, b in zip(written, written[1:], strict=False)), written
        assert set(written) < set(recorded), (written, recorded)
        last = written[-1]

        faults.start_worker(f"w{len(faults.workers)}")
        done = wait_job(client, job_id, timeout=120)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["resumed_from_epoch"] == last
        assert done["result"]["checkpoint_every"] == {"epochs": 2, "min_seconds": 0.5}
        logs = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]
        assert any(f"attempt 2 resumes from epoch-{last:04d}.safetensors (epoch {last})" in m
                   for m in logs), logs
        assert checkpoint_epochs(client, job_id)[-1] == epochs
        for name, seen in metric_epochs(client, job_id).items():
            assert seen == list(range(1, epochs + 1)), name


def test_a_canceled_job_keeps_a_checkpoint_of_its_last_finished_epoch(faults):
    """A cadence that would checkpoint only the last epoch: canceled after two epochs, the
    worker writes the checkpoint of the last epoch it finished before it stops."""
    live_worker(faults)
    env_url = faults.env["CONVOY_DATABASE_URL"]
    with faults.client() as client:
        job_id = client.post("/v1/jobs", json=cadence_job(
            40, {"epochs": 1000, "min_seconds": 0})).json()["id"]
        wait_for(lambda: len(metric_epochs(client, job_id).get("val_loss", [])) >= 2 or None,
                 timeout=120, what=f"two epochs of {job_id}")
        assert checkpoint_epochs(client, job_id) == []  # the cadence skipped them
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        ended = wait_for(lambda: [a for a in attempts(env_url, job_id) if a[3] is not None],
                         timeout=60, every=0.05, what="the worker to stop")
        assert ended[0][4] == "canceled"
        recorded = metric_epochs(client, job_id)["val_loss"]
        assert checkpoint_epochs(client, job_id) == [max(recorded)], recorded
        assert client.get(f"/v1/jobs/{job_id}/checkpoints/last").status_code == 200
        logs = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]
        assert any(f"stopping: wrote epoch-{max(recorded):04d}.safetensors" in m
                   for m in logs), logs
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "canceled"


def test_warm_shutdown_checkpoints_the_last_finished_epoch_the_cadence_skipped(faults):
    """SIGTERM under a cadence that would checkpoint only the last epoch: the worker writes
    the checkpoint of its last finished epoch before it hands the job back, and the next
    attempt resumes from there."""
    live_worker(faults)
    epochs = 8
    with faults.client() as client:
        job_id = client.post("/v1/jobs", json=cadence_job(
            epochs, {"epochs": 1000, "min_seconds": 0})).json()["id"]
        wait_for(lambda: len(metric_epochs(client, job_id).get("val_loss", [])) >= 2 or None,
                 timeout=120, what=f"two epochs of {job_id}")
        worker = next(p for p in faults.workers if p.poll() is None)
        Stack.kill(worker, signal.SIGTERM)  # waits for the process to exit
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "queued"
        finished = max(metric_epochs(client, job_id)["val_loss"])
        assert checkpoint_epochs(client, job_id) == [finished]

        faults.start_worker(f"w{len(faults.workers)}")
        done = wait_job(client, job_id, timeout=120)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["resumed_from_epoch"] == finished
        assert checkpoint_epochs(client, job_id) == [finished, epochs]
