"""A private PostgreSQL cluster stopped for a few seconds while a job runs: the API says it
is not ready, the worker keeps training and retries its writes, and when the database is back
the job finishes on its first attempt (the reconciler gives leases a grace period, so the
heartbeats that could not be written do not count against the worker)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.infra import (
    PrivatePostgres,
    make_stack,
    metric_epochs,
    slow_job,
    stop_fast,
    wait_for,
)
from tests.services import REDIS, Stack, wait_job

EPOCHS = 5
OUTAGE_S = 6  # longer than the lease: without the grace period the job would be requeued


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, PrivatePostgres]]:
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        stack = make_stack(Path(tmp_path_factory.mktemp("outage")),
                           database_url=pg.create_database(), broker_url=f"{REDIS}/0",
                           lease_seconds=4, reconcile_interval_seconds=0.5)
        try:
            stack.start_api()
            stack.start_worker("w0")
            yield stack, pg
        finally:
            stop_fast(stack)
    finally:
        pg.destroy()


def test_database_down_for_seconds_mid_job_then_the_job_finishes(outage):
    stack, pg = outage
    with stack.client() as client:
        assert client.get("/readyz").status_code == 200
        job_id = client.post("/v1/jobs", json=slow_job(EPOCHS)).json()["id"]
        wait_for(lambda: metric_epochs(client, job_id).get("val_loss"), timeout=120,
                 what="epoch 1")

        pg.stop()
        down_at = time.monotonic()
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["database"].startswith("error")
        assert r.json()["checks"]["broker"] == "ok"
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
        assert client.get("/readyz").status_code == 503
        pg.start()

        wait_for(lambda: _ready(client), timeout=30, what="readyz 200 again")
        done = wait_job(client, job_id, timeout=180)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempt"] == 1
        assert done["result"]["resumed_from_epoch"] == 0
        for name, epochs in metric_epochs(client, job_id).items():
            assert epochs == list(range(1, EPOCHS + 1)), name
    assert "database unreachable" in stack.log_text("w0") or \
        "heartbeat for job" in stack.log_text("w0")


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False
