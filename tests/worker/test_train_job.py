"""The fence of a checkpoint's files (worker.train_job.TrainRun._may_write_files) on a real
PostgreSQL database: within half a lease of its newest renewal an attempt writes without a
lease check (no other attempt can hold the job yet); past that it asks the database, and a
worker whose lease was lost meanwhile writes nothing."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from sqlalchemy import event

from convoy.settings import Settings
from db import jobs
from db.base import utcnow
from db.session import get_engine, session_scope
from db.tables import Job
from tests.factories import train_request
from worker import checkpoints
from worker.train_job import Finished, TrainRun


def claimed(migrated_url: str, tmp_path: Path, *, renewed_s_ago: float) -> tuple[TrainRun, Job]:
    with session_scope(migrated_url) as session:
        made = jobs.create_job(session, tenant="t", kind="train", name="fence",
                               request=train_request(1), summary=None, max_attempts=3)
    with session_scope(migrated_url) as session:
        job = jobs.claim_job(session, job_id=made.id, worker_id="w")
        assert job is not None
    settings = Settings(home=tmp_path, database_url=migrated_url, lease_seconds=30)
    run = TrainRun(settings, job, "w", claimed_at=time.monotonic() - renewed_s_ago)
    return run, job


def statements(migrated_url: str, fn: object) -> int:
    seen: list[str] = []

    def count(*_: object) -> None:
        seen.append("")

    engine = get_engine(migrated_url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        assert callable(fn)
        fn()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(seen)


def test_a_fresh_claim_writes_files_without_asking_the_database(migrated_url, tmp_path):
    run, _ = claimed(migrated_url, tmp_path, renewed_s_ago=1)
    assert statements(migrated_url, lambda: run._may_write_files() or pytest.fail("refused")) == 0


def test_past_half_a_lease_the_database_decides(migrated_url, tmp_path):
    held, _ = claimed(migrated_url, tmp_path, renewed_s_ago=16)
    assert held._may_write_files()

    lost, job = claimed(migrated_url, tmp_path, renewed_s_ago=16)
    with session_scope(migrated_url) as session:  # the lease expired; the job is queued again
        requeued = jobs.requeue_expired(session, lease_seconds=30,
                                        now=utcnow() + timedelta(seconds=31))
        assert job.id in requeued
    assert not lost._may_write_files()


def test_an_epoch_record_renews_the_fence(migrated_url, tmp_path):
    run, _ = claimed(migrated_url, tmp_path, renewed_s_ago=16)
    assert not run._fresh()
    model = torch.nn.Linear(2, 2)
    done = Finished(1, 1, {"val_loss": 0.5},
                    checkpoints.snapshot(model, torch.optim.SGD(model.parameters(), lr=0.1)))
    run._persist_epoch(done, False)  # an epoch without files: its record renews the lease
    assert run._fresh() and not run.lease_lost
    assert statements(migrated_url, lambda: run._persist_epoch(done, True)) > 0  # the record only
    assert run.written == 1
