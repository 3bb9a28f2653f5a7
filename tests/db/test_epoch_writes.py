"""db.jobs.record_epoch, record_stop_checkpoint and succeed_with_last_epoch on real databases
(PostgreSQL and SQLite): one transaction of multi-row upserts, idempotent under a retried
commit (issue 22)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import jobs, webhooks
from db.base import utcnow
from db.migrate import upgrade
from db.session import get_engine, session_scope
from db.tables import Artifact, Job, JobAttempt, JobLog, Metric, WebhookDelivery
from tests.db.test_transitions import queued, running


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, db_url: str, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgresql":
        yield db_url
        return
    sqlite = f"sqlite:///{tmp_path / 'convoy.db'}"
    upgrade(sqlite)
    yield sqlite
    get_engine(sqlite).dispose()


def row(job_id: str, kind: str, name: str, sha: str) -> Artifact:
    return Artifact(job_id=job_id, tenant="t", kind=kind, name=name,
                    key=f"jobs/{job_id}/checkpoints/{name}", size=10, sha256=sha,
                    meta={"epoch": 1, "metrics": {"val_loss": 0.6}})


def record(url: str, job_id: str, values: dict[str, float], sha: str | None,
           worker_id: str = "w") -> bool:
    """Epoch 1's record; with its checkpoint rows unless `sha` is None (on PostgreSQL an
    epoch without files is a single statement, with files several)."""
    rows = [] if sha is None else [
        row(job_id, "checkpoint", "epoch-0001.safetensors", sha),
        row(job_id, "optimizer", "epoch-0001.optimizer.safetensors", sha)]
    with session_scope(url) as session:
        return jobs.record_epoch(
            session, job_id=job_id, worker_id=worker_id, epoch=1, step=4, metrics=values,
            progress=0.5, artifacts=rows)


def test_a_retried_epoch_write_without_files_stores_each_point_once(url: str):
    job_id = running(url)
    for _ in range(2):
        assert record(url, job_id, {"train_loss": 0.5, "val_loss": 0.6}, None)
    assert record(url, job_id, {"train_loss": 0.4, "val_loss": 0.6}, None)  # trained again
    assert not record(url, job_id, {"train_loss": 9.0}, None, worker_id="other")
    assert stored(url, job_id) == ([("train_loss", 1, 0.4), ("val_loss", 1, 0.6)], [])
    with session_scope(url) as session:
        progress = session.scalar(select(Job.progress).where(Job.id == job_id))
    assert progress == 0.5


def stored(url: str, job_id: str) -> tuple[list[tuple[str, int, float]], list[tuple[str, str]]]:
    with session_scope(url) as session:
        points = session.execute(select(Metric.name, Metric.epoch, Metric.value)
                                 .where(Metric.job_id == job_id).order_by(Metric.name)).all()
        rows = session.execute(select(Artifact.name, Artifact.sha256)
                               .where(Artifact.job_id == job_id).order_by(Artifact.name)).all()
    return [tuple(p) for p in points], [tuple(r) for r in rows]


def test_a_retried_epoch_write_stores_each_point_and_row_once(url: str):
    job_id = running(url)
    values = {"train_loss": 0.5, "val_loss": 0.6}
    for _ in range(2):  # the reply to the first commit was lost; the worker retries
        assert record(url, job_id, values, "a" * 64)
    assert stored(url, job_id) == (
        [("train_loss", 1, 0.5), ("val_loss", 1, 0.6)],
        [("epoch-0001.optimizer.safetensors", "a" * 64), ("epoch-0001.safetensors", "a" * 64)])


def test_an_epoch_trained_again_replaces_its_points_and_rows(url: str):
    job_id = running(url)
    assert record(url, job_id, {"train_loss": 0.5, "val_loss": 0.6}, "a" * 64)
    assert record(url, job_id, {"train_loss": 0.4, "val_loss": 0.7}, "b" * 64)
    points, rows = stored(url, job_id)
    assert points == [("train_loss", 1, 0.4), ("val_loss", 1, 0.7)]
    assert [sha for _, sha in rows] == ["b" * 64] * 2


def test_another_workers_epoch_write_changes_nothing(url: str):
    job_id = running(url)
    assert not record(url, job_id, {"val_loss": 0.6}, "a" * 64, worker_id="other")
    assert stored(url, job_id) == ([], [])


def stop_write(url: str, job_id: str, *, attempt: int = 1) -> bool:
    with session_scope(url) as session:
        return jobs.record_stop_checkpoint(
            session, job_id=job_id, worker_id="w", attempt=attempt, epoch=1, step=4,
            metrics={"val_loss": 0.6},
            artifacts=[row(job_id, "checkpoint", "epoch-0001.safetensors", "c" * 64)])


def test_a_canceled_attempt_may_write_its_stop_checkpoint_a_requeued_one_may_not(url: str):
    canceled = running(url)
    with session_scope(url) as session:
        jobs.cancel_job(session, job_id=canceled, tenant=None)
        assert jobs.may_write_stop_checkpoint(session, job_id=canceled, worker_id="w",
                                              attempt=1)
    assert not stop_write(url, canceled, attempt=2)  # not this attempt's
    assert stop_write(url, canceled)
    assert stored(url, canceled) == ([("val_loss", 1, 0.6)],
                                     [("epoch-0001.safetensors", "c" * 64)])

    lost = running(url)
    with session_scope(url) as session:
        assert jobs.requeue_expired(session, lease_seconds=30,
                                    now=utcnow() + timedelta(seconds=31)) == [lost]
        assert not jobs.may_write_stop_checkpoint(session, job_id=lost, worker_id="w",
                                                  attempt=1)
    assert not stop_write(url, lost)
    assert stored(url, lost) == ([], [])


def succeed(url: str, job_id: str, worker_id: str = "w") -> bool:
    """The last epoch (2) with its checkpoint rows and the job's success, in one transaction."""
    with session_scope(url) as session:
        return jobs.succeed_with_last_epoch(
            session, job_id=job_id, worker_id=worker_id, epoch=2, step=8,
            metrics={"val_loss": 0.5},
            artifacts=[row(job_id, "checkpoint", "epoch-0002.safetensors", "d" * 64)],
            result={"epochs_done": 2, "val_loss": 0.5}, log_line="succeeded: 2 epochs")


def outcome(url: str, job_id: str) -> tuple[str, float, Any, list[str | None], list[str]]:
    with session_scope(url) as session:
        job = session.get(Job, job_id)
        assert job is not None
        ends = list(session.scalars(select(JobAttempt.outcome)
                                    .where(JobAttempt.job_id == job_id)))
        lines = list(session.scalars(select(JobLog.message).where(JobLog.job_id == job_id)))
        return job.state, job.progress, job.result, ends, lines


def test_the_last_epoch_and_the_success_commit_together(url: str):
    job_id = running(url)
    assert succeed(url, job_id)
    assert stored(url, job_id) == ([("val_loss", 2, 0.5)],
                                   [("epoch-0002.safetensors", "d" * 64)])
    assert outcome(url, job_id) == ("succeeded", 1.0, {"epochs_done": 2, "val_loss": 0.5},
                                    ["succeeded"], ["succeeded: 2 epochs"])
    # a retried commit (its first reply lost) finds the job no longer running: nothing twice
    assert not succeed(url, job_id)
    assert outcome(url, job_id)[3:] == (["succeeded"], ["succeeded: 2 epochs"])


def test_the_last_epoch_of_a_worker_that_lost_its_lease_writes_nothing(url: str):
    canceled = running(url)
    with session_scope(url) as session:
        jobs.cancel_job(session, job_id=canceled, tenant=None)
    assert not succeed(url, canceled)
    assert stored(url, canceled) == ([], [])
    assert outcome(url, canceled)[0] == "canceled"

    taken = running(url, worker_id="a")
    assert not succeed(url, taken, worker_id="b")
    assert stored(url, taken) == ([], [])
    assert outcome(url, taken) == ("running", 0.0, None, [None], [])


def test_a_failing_statement_leaves_neither_the_rows_nor_the_success(url: str):
    """Atomic: a retention decision that fails after the rows are written (here, by raising)
    rolls the success back with them."""
    job_id = running(url)

    def broken(_session: Session) -> None:
        raise RuntimeError("retention failed")

    with pytest.raises(RuntimeError), session_scope(url) as session:
        jobs.succeed_with_last_epoch(
            session, job_id=job_id, worker_id="w", epoch=2, step=8, metrics={"val_loss": 0.5},
            artifacts=[row(job_id, "checkpoint", "epoch-0002.safetensors", "d" * 64)],
            result={"epochs_done": 2}, before_commit=broken)
    assert stored(url, job_id) == ([], [])
    assert outcome(url, job_id)[:2] == ("running", 0.0)


def test_the_success_queues_the_tenants_webhooks_with_its_result(url: str):
    tenant = f"hooked-{uuid.uuid4().hex[:8]}"
    [job_id] = queued(url, tenant=tenant)
    with session_scope(url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id="w") is not None
        webhooks.create(session, tenant=tenant, url="https://example.com/h",
                        events=["job.succeeded"])
        webhooks.create(session, tenant=tenant, url="https://example.com/f",
                        events=["job.failed"])
        session.commit()
    assert succeed(url, job_id)
    with session_scope(url) as session:
        bodies = list(session.scalars(select(WebhookDelivery.body)
                                      .where(WebhookDelivery.job_id == job_id)))
    assert len(bodies) == 1
    data = json.loads(bodies[0])
    assert data["type"] == "job.succeeded"
    assert data["data"]["result"] == {"epochs_done": 2, "val_loss": 0.5}


def points(url: str, job_id: str) -> list[tuple[int, int, str, float]]:
    with session_scope(url) as session:
        return sorted(tuple(r) for r in session.execute(
            select(Metric.epoch, Metric.step, Metric.name, Metric.value)
            .where(Metric.job_id == job_id)))


def test_earlier_epochs_go_with_a_record_a_stop_and_the_outcome_or_not_at_all(url: str):
    """Short epochs recorded together (worker.train_job): the `earlier` epochs' points are
    written with the record that carries them (with or without files), the stop checkpoint
    and the outcome, at their own epochs and steps, and with nothing when the fence
    refuses."""
    e = jobs.EpochPoints
    job_id = running(url)
    with session_scope(url) as session:  # someone else's write: none of it
        assert not jobs.record_epoch(session, job_id=job_id, worker_id="other", epoch=2,
                                     step=8, metrics={"val_loss": 0.7}, progress=0.5,
                                     earlier=[e(1, 4, {"val_loss": 0.8})])
    assert points(url, job_id) == []
    with session_scope(url) as session:  # a record without files: one statement on PG
        assert jobs.record_epoch(session, job_id=job_id, worker_id="w", epoch=2, step=8,
                                 metrics={"val_loss": 0.7}, progress=0.5,
                                 earlier=[e(1, 4, {"val_loss": 0.8, "lr": 0.1})])
    with session_scope(url) as session:  # a stop checkpoint's, with its files
        assert jobs.record_stop_checkpoint(
            session, job_id=job_id, worker_id="w", attempt=1, epoch=4, step=16,
            metrics={"val_loss": 0.5}, earlier=[e(3, 12, {"val_loss": 0.6})],
            artifacts=[row(job_id, "checkpoint", "epoch-0004.safetensors", "e" * 64)])
    with session_scope(url) as session:  # the outcome's
        assert jobs.succeed_with_last_epoch(
            session, job_id=job_id, worker_id="w", epoch=6, step=24,
            metrics={"val_loss": 0.3}, earlier=[e(5, 20, {"val_loss": 0.4})],
            artifacts=[row(job_id, "checkpoint", "epoch-0006.safetensors", "f" * 64)],
            result={"epochs_done": 6})
    assert points(url, job_id) == [
        (1, 4, "lr", 0.1), (1, 4, "val_loss", 0.8), (2, 8, "val_loss", 0.7),
        (3, 12, "val_loss", 0.6), (4, 16, "val_loss", 0.5), (5, 20, "val_loss", 0.4),
        (6, 24, "val_loss", 0.3)]
