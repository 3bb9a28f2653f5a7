"""A worker killed mid-epoch, and cancel: a short lease (3 s) and a fast reconciler, so a
lost worker's job is requeued within seconds and resumed from its last checkpoint."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

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
