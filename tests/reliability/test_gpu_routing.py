"""Mixed fleets: a job that asks for CUDA waits on the GPU queue, which `convoy worker` reads
only on a machine with a CUDA device (or when told to); a CPU worker never takes it."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.reliability.infra import api_without_workers, attempts, tiny_job
from tests.services import Stack, wait_job


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Stack]:
    with api_without_workers(tmp_path) as stack:
        yield stack


def convoy_worker(stack: Stack, name: str) -> None:
    stack.start_worker(name, cmd=[sys.executable, "-m", "cli.main", "worker", "--name", name])


def test_a_cuda_job_waits_for_a_gpu_worker_and_a_cpu_worker_never_takes_it(fleet):
    env_url = fleet.env["CONVOY_DATABASE_URL"]
    cuda = torch.cuda.is_available()
    # each worker owns 2 devices (at most the GPUs it sees on a GPU host): it reads the
    # 2-device queue beside each queue it reads
    fleet.env["CONVOY_WORKER_DEVICES"] = "2"

    def two(*queues: str) -> list[str]:
        return list(queues) if not cuda or torch.cuda.device_count() >= 2 else []
    if cuda:  # a CPU worker here is one told so; without CUDA, `convoy worker` finds it alone
        fleet.env["CONVOY_WORKER_GPU_QUEUE"] = "false"
    convoy_worker(fleet, "cpu")  # the main queue only
    assert f"{fleet.env['CONVOY_QUEUE']}-gpu" not in fleet.log_text("cpu")
    with fleet.client() as client:
        gpu_job = client.post("/v1/jobs", json={**tiny_job(1), "device": "cuda"}).json()["id"]
        cpu_job = client.post("/v1/jobs", json=tiny_job(2)).json()["id"]
        assert wait_job(client, cpu_job)["state"] == "succeeded"
        time.sleep(1.0)  # the CPU worker is idle, and the GPU job's message is there for it
        assert client.get(f"/v1/jobs/{gpu_job}").json()["state"] == "queued"
        assert attempts(env_url, gpu_job) == []

        # a worker told it has a GPU (on a machine without one the job then fails, clearly)
        fleet.env["CONVOY_WORKER_GPU_QUEUE"] = "true"
        convoy_worker(fleet, "gpu")
        assert f"{fleet.env['CONVOY_QUEUE']}-gpu" in fleet.log_text("gpu")
        # each worker reports the queues it reads (GET /v1/workers)
        queue = fleet.env["CONVOY_QUEUE"]
        assert {w["id"]: w["queues"] for w in client.get("/v1/workers").json()} == {
            "cpu": sorted([queue, *two(f"{queue}-x2")]),
            "gpu": sorted([queue, f"{queue}-gpu", *two(f"{queue}-gpu-x2", f"{queue}-x2")])}
        done = wait_job(client, gpu_job)
    if cuda:
        assert done["state"] == "succeeded", done["error"]
    else:
        assert done["state"] == "failed"
        assert "device 'cuda' was asked for but this worker has no CUDA device" in done["error"]
    assert [(a, w) for a, w, *_ in attempts(env_url, gpu_job)] == [(1, "gpu")]
