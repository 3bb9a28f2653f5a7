"""The counts /metrics is made of, on SQLite and PostgreSQL: jobs by kind and state, and the
queue-wait and run-time histograms computed from each job's timestamps."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from db import jobs, stats
from db.base import utcnow
from db.session import session_scope
from db.tables import Job
from tests.db.test_workers import url  # noqa: F401 - the fixture: a database of each kind

BOUNDS = (1.0, 10.0, 100.0)


def test_counts_and_histograms_from_the_rows(url: str) -> None:  # noqa: F811
    t0 = utcnow() - timedelta(hours=1)
    # (kind, state, waited s, ran s); None: never started / not ended
    rows = [("train", "succeeded", 0.5, 5.0), ("train", "succeeded", 2.0, 50.0),
            ("train", "failed", 20.0, 500.0), ("feature_maps", "canceled", None, None),
            ("train", "running", 0.25, None), ("train", "queued", None, None)]
    with session_scope(url) as session:
        for kind, state, waited, ran in rows:
            job = jobs.create_job(session, tenant="t", kind=kind, name="", request={},
                                  summary=None, max_attempts=1)
            session.flush()
            started = t0 + timedelta(seconds=waited) if waited is not None else None
            finished = started + timedelta(seconds=ran) if started and ran is not None \
                else (t0 + timedelta(seconds=1) if state == "canceled" else None)
            session.execute(update(Job).where(Job.id == job.id).values(
                state=state, created_at=t0, started_at=started, finished_at=finished))
        session.commit()
        assert stats.submitted_by_kind(session) == {"train": 5, "feature_maps": 1}
        assert stats.finished_by_kind_state(session) == {
            ("train", "succeeded"): 2, ("train", "failed"): 1, ("feature_maps", "canceled"): 1}
        assert stats.jobs_by_state(session) == {"succeeded": 2, "failed": 1, "canceled": 1,
                                                "running": 1, "queued": 1}
        wait = stats.queue_wait(session, BOUNDS)
        run = stats.run_time(session, BOUNDS)
    # every job that started (the running one too), cumulative per bound
    assert (wait.count, wait.buckets) == (4, [2, 3, 4])
    assert wait.sum == pytest.approx(0.5 + 2 + 20 + 0.25, abs=1e-3)
    # every job that started and ended
    assert (run.count, run.buckets) == (3, [0, 1, 2])
    assert run.sum == pytest.approx(555.0, abs=1e-3)
