"""Multi-device train jobs on CPU (gloo, one thread per rank) through a real API and real
Celery workers: parity with one device, a rank SIGKILLed mid-epoch, cancel, and a job asking
for more devices than the fleet owns."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from tests.factories import train_request
from tests.reliability.infra import api_without_workers, attempts, slow_job, wait_for
from tests.services import Stack, wait_job

# 1438 training digits in batches of 45: shares of 23 and 22, and a last batch of 43 (22/21)
BATCH = 45


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker owning 2 CPU devices; a short lease and a fast reconciler."""
    with api_without_workers(Path(tmp_path_factory.mktemp("ddp")), lease_seconds=3,
                             reconcile_interval_seconds=0.5) as stack:
        start_worker(stack, "w2", devices=2)
        yield stack


def start_worker(stack: Stack, name: str, *, devices: int) -> None:
    stack.env["CONVOY_WORKER_DEVICES"] = str(devices)
    try:
        stack.start_worker(name)
    finally:
        del stack.env["CONVOY_WORKER_DEVICES"]


def rank_pids(job_id: str) -> dict[int, int]:
    """rank -> pid of the job's live rank processes, from the process table."""
    found: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker.rank" in argv and job_id.encode() in argv:
            found[int(argv[argv.index(job_id.encode()) + 1])] = int(proc.name)
    return found


def gone(pids: dict[int, int]) -> bool:
    """None of these processes is in the process table, not even as a zombie (reaped)."""
    return not any(Path(f"/proc/{pid}").exists() for pid in pids.values())


def weights(client: Any, job_id: str) -> dict[str, torch.Tensor]:
    return load(client.get(f"/v1/jobs/{job_id}/checkpoints/last").content)


def series(client: Any, job_id: str, name: str) -> list[float]:
    return [p["value"] for p in
            client.get(f"/v1/jobs/{job_id}/metrics").json()["series"][name]]


def two_rank(request: dict[str, Any], devices: int = 2) -> dict[str, Any]:
    return {**request, "resources": {"devices": devices}}


def test_two_ranks_follow_the_one_device_trajectory(fleet: Stack) -> None:
    one = train_request(3, batch_size=BATCH, seed=3)
    with fleet.client() as client:
        r1 = client.post("/v1/jobs", json=one)
        r2 = client.post("/v1/jobs", json=two_rank(one))
        assert r1.status_code == 201 and r2.status_code == 201, r2.text
        assert r2.json()["summary"]["resources"] == {
            "devices": 2, "global_batch": BATCH, "per_rank_batch": 23,
            "sync_batch_norm": False}
        single, double = (wait_job(client, r.json()["id"], timeout=240) for r in (r1, r2))
        assert single["state"] == "succeeded", single["error"]
        assert double["state"] == "succeeded", double["error"]
        assert (single["result"]["world_size"], double["result"]["world_size"]) == (1, 2)
        assert series(client, double["id"], "world_size") == [2, 2, 2]
        for name in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
            a, b = series(client, single["id"], name), series(client, double["id"], name)
            assert len(a) == len(b) == 3
            assert a == pytest.approx(b, rel=1e-4), name
        w1, w2 = weights(client, single["id"]), weights(client, double["id"])
        assert w1.keys() == w2.keys()  # the same tensor names: no "module." prefix
        for key in w1:
            assert torch.allclose(w1[key], w2[key], rtol=1e-4, atol=1e-4), key
        # the trajectory moved: equal weights are not the untrained ones
        assert (w2["layers.0.weight"] - weights_at_epoch(client, double["id"], 1)[
            "layers.0.weight"]).abs().max() > 1e-3
        logs = [line["message"] for line in client.get(f"/v1/jobs/{double['id']}/logs").json()]
        assert any("2 ranks (gloo, CPU, one thread each)" in m for m in logs), logs


def weights_at_epoch(client: Any, job_id: str, epoch: int) -> dict[str, torch.Tensor]:
    return load(client.get(f"/v1/jobs/{job_id}/checkpoints/epoch-{epoch:04d}.safetensors")
                .content)


def test_a_sigkilled_rank_fails_the_attempt_and_the_job_resumes_on_attempt_2(
        fleet: Stack) -> None:
    url = fleet.env["CONVOY_DATABASE_URL"]
    with fleet.client() as client:
        job_id = client.post("/v1/jobs", json=two_rank(slow_job(3))).json()["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}/checkpoints").json(), timeout=180,
                 what="epoch 1's checkpoint")
        pids = wait_for(lambda: (p := rank_pids(job_id)) and len(p) == 2 and p, timeout=10)
        os.kill(pids[1], signal.SIGKILL)
        done = wait_job(client, job_id, timeout=240)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempt"] == 2
        assert done["result"]["resumed_from_epoch"] >= 1
        assert done["result"]["world_size"] == 2
        first, second = client.get(f"/v1/jobs/{job_id}/attempts").json()
        assert first["outcome"] == "rank_failed"
        assert f"rank 1 (pid {pids[1]}) was killed by SIGKILL" in first["error"]
        assert second["outcome"] == "succeeded"
        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert [c["epoch"] for c in checkpoints] == [1, 2, 3]
    assert [a[4] for a in attempts(url, job_id)] == ["rank_failed", "succeeded"]
    assert gone(pids) and rank_pids(job_id) == {}


def test_cancel_stops_both_ranks_within_5s_and_leaves_no_rank_behind(fleet: Stack) -> None:
    with fleet.client() as client:
        job_id = client.post("/v1/jobs", json=two_rank(slow_job(30))).json()["id"]
        pids = wait_for(lambda: (p := rank_pids(job_id)) and len(p) == 2 and p, timeout=120,
                        what="both ranks")
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"] > 0,
                 timeout=120, what="training under way")
        asked = time.monotonic()
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "canceled"
        wait_for(lambda: gone(pids), timeout=30, every=0.05, what="the ranks to stop")
        stopped_after = time.monotonic() - asked
        assert stopped_after < 5, f"ranks stopped {stopped_after:.1f}s after the cancel"
        assert rank_pids(job_id) == {}
        [attempt] = wait_for(lambda: [a for a in client.get(f"/v1/jobs/{job_id}/attempts")
                                      .json() if a["outcome"]], timeout=30)
        assert attempt["outcome"] == "canceled"
        # the worker is free again
        probe = client.post("/v1/jobs", json=train_request(1)).json()["id"]
        assert wait_job(client, probe, timeout=120)["state"] == "succeeded"


def test_a_4_device_job_waits_with_a_reason_until_a_4_device_worker_joins(
        fleet: Stack) -> None:
    with fleet.client() as client:
        job_id = client.post("/v1/jobs", json=two_rank(train_request(1), devices=4)).json()["id"]
        time.sleep(1.5)  # the 2-device worker would have taken it by now if it could
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "queued"
        assert "asks for 4 devices and no live worker owns that many (the most: 2)" in \
            job["waiting_reason"]
        start_worker(fleet, "w4", devices=4)
        done = wait_job(client, job_id, timeout=180)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["world_size"] == 4
        [attempt] = client.get(f"/v1/jobs/{job_id}/attempts").json()
        assert attempt["worker_id"] == "w4"


def test_bad_device_counts_are_422_naming_the_field(fleet: Stack) -> None:
    with fleet.client() as client:
        for resources, words in (({"devices": 0}, "greater than or equal to 1"),
                                 ({"devices": 9}, "max_devices_per_job=8"),
                                 ({"devices": "two"}, "valid integer"),
                                 ({"devices": 2, "gpus": 1}, "Extra inputs")):
            r = client.post("/v1/jobs", json={**train_request(1), "resources": resources})
            assert r.status_code == 422, r.text
            assert "resources" in str(r.json()["detail"]) and words in r.text, r.text
        r = client.post("/v1/jobs", json={**train_request(1, batch_size=3),
                                          "resources": {"devices": 4}})
        assert r.status_code == 422 and "global batch_size of 3" in r.text


def test_warm_shutdown_stops_both_ranks_and_hands_the_job_back(fleet: Stack) -> None:
    """Last here: it stops the module's 2-device worker (another one resumes the job)."""
    with fleet.client() as client:
        job_id = client.post("/v1/jobs", json=two_rank(slow_job(3))).json()["id"]
        wait_for(lambda: client.get(f"/v1/jobs/{job_id}/checkpoints").json(), timeout=180,
                 what="epoch 1's checkpoint")
        pids = wait_for(lambda: (p := rank_pids(job_id)) and len(p) == 2 and p, timeout=10)
        # the worker running it: the ranks' parent
        parent = int(Path(f"/proc/{pids[0]}/stat").read_text().split(") ", 1)[1].split()[1])
        worker = next(p for p in fleet.workers if p.pid == parent)
        asked = time.monotonic()
        os.killpg(worker.pid, signal.SIGTERM)  # docker stop, Ctrl-C in a terminal
        wait_for(lambda: gone(pids), timeout=30, every=0.05, what="the ranks to stop")
        stopped_after = time.monotonic() - asked
        assert stopped_after < 5, f"ranks stopped {stopped_after:.1f}s after SIGTERM"
        assert worker.wait(timeout=30) is not None
        first = wait_for(lambda: [a for a in client.get(f"/v1/jobs/{job_id}/attempts").json()
                                  if a["outcome"]], timeout=30)[0]
        assert first["outcome"] == "released"
        start_worker(fleet, "w2b", devices=2)  # (or the 4-device worker, if it is still up)
        done = wait_job(client, job_id, timeout=240)
        assert done["state"] == "succeeded", done["error"]
        assert done["result"]["resumed_from_epoch"] >= 1 and done["attempt"] == 2
