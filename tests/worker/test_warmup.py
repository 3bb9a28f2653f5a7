"""A starting worker warms up (digits parsed, one tiny training run) before it says ready and
takes its first message, so the first job costs what the next ones do; a job already queued
waits for the warm-up, which never changes what a seed gives."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from safetensors.torch import load

from tests.factories import train_request
from tests.reliability.infra import api_without_workers
from tests.services import Stack, wait_job


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Stack]:
    with api_without_workers(tmp_path) as stack:
        yield stack


def test_a_job_queued_before_the_warm_up_runs_after_it_as_the_next_one_does(fresh):
    request = train_request(2, batch_size=32)
    with fresh.client() as client:
        first = client.post("/v1/jobs", json=request).json()["id"]  # queued before the worker
        fresh.start_worker("w0")  # returns once the worker is ready: warmed up
        a = wait_job(client, first)
        b = wait_job(client, client.post("/v1/jobs", json=request).json()["id"])
        assert a["state"] == b["state"] == "succeeded"
        assert a["result"]["val_loss"] == b["result"]["val_loss"]
        blobs = [load(client.get(f"/v1/jobs/{j['id']}/checkpoints/last").content) for j in (a, b)]
    assert all((blobs[0][k] == blobs[1][k]).all() for k in blobs[0])
    # the worker said ready after its warm-up, and only then took the job queued before it
    log = fresh.log_text("w0")
    assert log.index("warm-up done") < log.index(" ready.") < log.index("Task convoy.train")
    warm = re.search(r"warm-up done in [0-9.]+ s at (\S+)", log)
    assert warm, log[-2000:]
    assert datetime.fromisoformat(a["started_at"]) >= datetime.fromisoformat(warm.group(1))
