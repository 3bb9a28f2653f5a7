"""A job past its `timeout` fails with that reason and keeps its checkpoints; the running time
of earlier attempts counts. A real worker on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.reliability.infra import api_without_workers, attempts, sync_url, tiny_job
from tests.services import Stack, wait_job


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """No worker yet: the first test prepares its job's history before one starts."""
    with api_without_workers(Path(tmp_path_factory.mktemp("timeout")),
                             requeue_after_seconds=3600) as stack:
        yield stack


def endless_job(timeout: float) -> dict[str, Any]:
    """Epochs of a fraction of a second, far more of them than the timeout allows."""
    job = tiny_job(0)
    job["dataset"]["samples"] = 512
    job["train"].update(epochs=1000, batch_size=64)
    return {**job, "name": "endless", "timeout": timeout}


def test_earlier_attempts_count_toward_the_timeout(api: Stack) -> None:
    db = sync_url(api.env["CONVOY_DATABASE_URL"])
    with api.client() as c:
        job_id = c.post("/v1/jobs", json=endless_job(20)).json()["id"]
        # an earlier attempt that ran 18 s (as a worker lost after 18 s would leave it)
        ended = datetime.now(UTC) - timedelta(hours=1)
        with psycopg.connect(db) as conn:
            conn.execute("INSERT INTO job_attempts (job_id, attempt, worker_id, started_at, "
                         "ended_at, outcome) VALUES (%s, 0, 'gone', %s, %s, 'lease_expired')",
                         (job_id, ended - timedelta(seconds=18), ended))
        api.start_worker("w0")
        job = wait_job(c, job_id, timeout=50)
    assert job["state"] == "failed", job
    assert "timed out after" in job["error"], job["error"]
    ran = (datetime.fromisoformat(job["finished_at"])
           - datetime.fromisoformat(job["started_at"])).total_seconds()
    assert ran < 12, f"this attempt ran {ran:.1f} s: the earlier 18 s were not counted"
    assert attempts(api.env["CONVOY_DATABASE_URL"], job_id)[-1][4] == "failed"


def test_a_job_past_its_timeout_fails_with_the_reason_and_keeps_its_checkpoints(api: Stack):
    if not any(p.poll() is None for p in api.workers):
        api.start_worker(f"w{len(api.workers)}")
    with api.client() as c:
        job_id = c.post("/v1/jobs", json=endless_job(5)).json()["id"]
        job = wait_job(c, job_id, timeout=50)
        assert job["state"] == "failed", job
        assert job["error"].startswith("timed out after"), job["error"]
        assert "timeout 5 s" in job["error"]
        ran = (datetime.fromisoformat(job["finished_at"])
               - datetime.fromisoformat(job["started_at"])).total_seconds()
        assert 5 <= ran < 20, ran
        checkpoints = c.get(f"/v1/jobs/{job_id}/checkpoints").json()
        assert checkpoints, "the epochs done before the timeout lost their checkpoints"
        done = len(checkpoints)
        assert done < 1000
        # the last one is downloadable, whole
        blob = c.get(f"/v1/jobs/{job_id}/checkpoints/last")
        assert blob.status_code == 200 and len(blob.content) == checkpoints[-1]["size"]
