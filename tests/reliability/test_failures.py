"""Failures recorded clearly: an exception in the worker ends the job `failed` with its type
and message and the traceback in the job's log; CUDA out of memory says so and suggests a
smaller batch. The runner is called directly, on a real PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
import torch
from sqlalchemy import select, update

from convoy.settings import Settings
from db import job_reads, jobs
from db.base import utcnow
from db.migrate import upgrade
from db.session import session_scope
from db.tables import Job, JobAttempt, JobLog, Metric
from tests.factories import digits_cnn, train_request
from tests.services import create_pg_database, drop_pg_database
from worker.runner import failure_message, run_job


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    url = create_pg_database()
    upgrade(url)
    yield Settings(home=tmp_path_factory.mktemp("failures"), database_url=url)
    drop_pg_database(url)


def test_exception_in_the_worker_fails_the_job_with_type_message_and_traceback(settings):
    # Past the API's checks (written straight to the database): 16x16 images into a model
    # whose linear layer was sized for 8x8, so the forward pass raises inside the worker.
    request = train_request(1, model=digits_cnn(4), dataset={"name": "synthetic", "size": 16,
                                                             "channels": 1, "samples": 64})
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(session, tenant="t", kind="train", name="broken", request=request,
                              summary=None, max_attempts=3)
    assert run_job(job.id, settings=settings, worker_id="w") == "failed"
    with session_scope(settings.database_url) as session:
        done = job_reads.get_job(session, job_id=job.id)
        assert done.state == "failed" and done.finished_at is not None
        assert done.error.startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")
        [trace] = session.scalars(select(JobLog.message).where(JobLog.job_id == job.id,
                                                               JobLog.level == "error"))
        assert trace.startswith("Traceback (most recent call last)") and "forward" in trace
        outcomes = session.scalars(select(JobAttempt.outcome).where(JobAttempt.job_id == job.id))
        assert list(outcomes) == ["failed"]
    # a late duplicate of its message changes nothing
    assert run_job(job.id, settings=settings, worker_id="w2") == "skipped"


def test_out_of_memory_message_says_so_and_suggests_a_smaller_batch():
    message = failure_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert "out of memory" in message and "smaller batch_size" in message
    assert failure_message(ValueError("bad")) == "ValueError: bad"


def test_attempt_resumed_after_the_last_checkpoint_reports_the_same_result(settings):
    """The worker wrote the last epoch's checkpoint and metrics, then died before recording
    `succeeded`: the next attempt trains nothing and still reports the full result (training
    figures from the checkpoint, validation measured again on the same weights)."""
    request = train_request(2, model=digits_cnn(4))
    with session_scope(settings.database_url) as session:
        job = jobs.create_job(session, tenant="t", kind="train", name="resume-at-end",
                              request=request, summary=None, max_attempts=3)
    assert run_job(job.id, settings=settings, worker_id="w") == "done"
    with session_scope(settings.database_url) as session:
        first = dict(job_reads.get_job(session, job_id=job.id).result)
        # the death: the job is running again under an expired lease, no result recorded
        session.execute(update(Job).where(Job.id == job.id).values(
            state="running", result=None, finished_at=None, worker_id="w",
            heartbeat_at=utcnow() - timedelta(hours=1)))
        session.commit()
        assert jobs.requeue_expired(session, lease_seconds=30) == [job.id]
    assert run_job(job.id, settings=settings, worker_id="w2") == "done"
    with session_scope(settings.database_url) as session:
        done = job_reads.get_job(session, job_id=job.id)
        assert done.attempt == 2
        again = done.result
        steps = session.scalars(select(Metric.step).where(Metric.job_id == job.id,
                                                          Metric.name == "train_loss"))
        assert len(list(steps)) == 2, "the second attempt recorded metrics again"
    assert again["resumed_from_epoch"] == 2 and first["resumed_from_epoch"] == 0
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epochs_done",
                "steps"):
        assert again[key] == pytest.approx(first[key], rel=1e-6), key
