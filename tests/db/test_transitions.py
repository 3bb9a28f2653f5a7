"""db.jobs's state transitions on a real PostgreSQL database, without workers or an API: each
is a conditional UPDATE, so a duplicate message, a late worker or a second cancel can never
move a job backwards, run it twice at once, or write over another attempt's outcome."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from db import job_reads, jobs, leases
from db.base import utcnow
from db.session import session_scope
from db.tables import Job, JobAttempt, JobLog, Metric
from tests.factories import train_request


def queued(db_url: str, n: int = 1, *, tenant: str = "t", max_attempts: int = 2) -> list[str]:
    """Ids of n new queued train jobs of `tenant`."""
    with session_scope(db_url) as session:
        made = [jobs.create_job(session, tenant=tenant, kind="train", name="x",
                                request=train_request(1), summary=None,
                                max_attempts=max_attempts)
                for _ in range(n)]
        return [job.id for job in made]


def running(db_url: str, worker_id: str = "w", *, max_attempts: int = 2) -> str:
    """The id of a new job claimed by `worker_id`."""
    [job_id] = queued(db_url, max_attempts=max_attempts)
    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id=worker_id) is not None
    return job_id


def attempts(db_url: str, job_id: str) -> list[tuple[int, str, str | None, bool]]:
    """(attempt, worker, outcome, ended) rows of the job's lease history."""
    with session_scope(db_url) as session:
        rows = session.execute(
            select(JobAttempt.attempt, JobAttempt.worker_id, JobAttempt.outcome,
                   JobAttempt.ended_at).where(JobAttempt.job_id == job_id)
            .order_by(JobAttempt.attempt, JobAttempt.id)).all()
    return [(a, w, o, e is not None) for a, w, o, e in rows]


def state_of(db_url: str, job_id: str) -> str | None:
    with session_scope(db_url) as session:
        return job_reads.job_state(session, job_id=job_id)


# -- claim -------------------------------------------------------------------------------------

def test_claim_runs_a_queued_job_once_and_records_the_attempt(db_url):
    [job_id] = queued(db_url)
    with session_scope(db_url) as session:
        job = jobs.claim_job(session, job_id=job_id, worker_id="a")
        assert job is not None
        assert (job.state, job.worker_id, job.attempt) == ("running", "a", 1)
        assert job.started_at is not None and job.heartbeat_at is not None
        assert jobs.claim_job(session, job_id=job_id, worker_id="b") is None  # a duplicate
        assert jobs.claim_job(session, job_id=job_id, worker_id="a") is None  # even its own
    assert attempts(db_url, job_id) == [(1, "a", None, False)]


def test_a_claim_records_the_attempts_device_and_first_line_with_it(db_url):
    [job_id] = queued(db_url)
    seen: list[int] = []

    def started(job: Job) -> tuple[str, str]:
        seen.append(job.attempt)
        return "cuda:0 (an accelerator with a long name)", f"attempt {job.attempt} started"

    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id="a", max_running=4,
                              started=started) is not None
        # a duplicate claim asks nothing and writes nothing
        assert jobs.claim_job(session, job_id=job_id, worker_id="b", started=started) is None
        device = session.scalar(select(JobAttempt.device).where(JobAttempt.job_id == job_id))
        lines = list(session.scalars(select(JobLog.message).where(JobLog.job_id == job_id)))
    assert seen == [1]
    assert device == "cuda:0 (an accelerator with a long name)"[:32]
    assert lines == ["attempt 1 started"]


def test_an_unknown_job_cannot_be_claimed(db_url):
    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id="0" * 32, worker_id="w") is None
        assert jobs.claim_job(session, job_id="0" * 32, worker_id="w", max_running=1) is None


@pytest.mark.parametrize("end", ["succeeded", "failed", "canceled"])
def test_a_finished_job_cannot_be_claimed_or_canceled(db_url, end):
    job_id = running(db_url)
    with session_scope(db_url) as session:
        if end == "canceled":
            jobs.cancel_job(session, job_id=job_id, tenant="t")
        else:
            assert jobs.finish_job(session, job_id=job_id, worker_id="w", state=end)
        assert jobs.claim_job(session, job_id=job_id, worker_id="w2") is None
        assert jobs.claim_job(session, job_id=job_id, worker_id="w2", max_running=5) is None
        with pytest.raises(jobs.WrongState) as refused:
            jobs.cancel_job(session, job_id=job_id, tenant="t")
        assert refused.value.state == end
        assert jobs.requeue_expired(session, lease_seconds=30,
                                    now=utcnow() + timedelta(hours=1)) == []
    assert state_of(db_url, job_id) == end


def test_claim_respects_max_running_per_tenant(db_url):
    a1, a2 = queued(db_url, 2, tenant="lim-a", max_attempts=1)
    (b1,) = queued(db_url, 1, tenant="lim-b", max_attempts=1)
    with session_scope(db_url) as s:
        assert jobs.claim_job(s, job_id=a1, worker_id="w1", max_running=1) is not None
    with session_scope(db_url) as s, pytest.raises(jobs.TenantAtLimit):
        jobs.claim_job(s, job_id=a2, worker_id="w2", max_running=1)
    with session_scope(db_url) as s:
        assert job_reads.job_state(s, job_id=a2) == "queued"
        assert jobs.claim_job(s, job_id=b1, worker_id="w2", max_running=1) is not None
        assert jobs.finish_job(s, job_id=a1, worker_id="w1", state="succeeded")
    with session_scope(db_url) as s:
        assert jobs.claim_job(s, job_id=a2, worker_id="w2", max_running=1) is not None
        # A job that is not queued any more is "not claimable", not "at the limit".
        assert jobs.claim_job(s, job_id=a2, worker_id="w3", max_running=1) is None


def test_concurrent_claims_never_pass_the_limit(db_url):
    """Eight workers claim eight of one tenant's jobs at once; the advisory lock lets two in."""
    ids = queued(db_url, 8, tenant="race", max_attempts=1)
    start = threading.Barrier(len(ids))
    outcome: dict[str, str] = {}

    def claim(job_id: str) -> None:
        start.wait()
        with session_scope(db_url) as s:
            try:
                got = jobs.claim_job(s, job_id=job_id, worker_id=f"w-{job_id[:6]}",
                                     max_running=2)
                outcome[job_id] = "claimed" if got else "skipped"
            except jobs.TenantAtLimit:
                outcome[job_id] = "deferred"

    threads = [threading.Thread(target=claim, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcome.values()) == ["claimed"] * 2 + ["deferred"] * 6


# -- heartbeat and finish ----------------------------------------------------------------------

def test_only_the_lease_holder_renews_and_finishes(db_url):
    job_id = running(db_url, "a")
    with session_scope(db_url) as session:
        assert leases.heartbeat(session, job_id=job_id, worker_id="a", progress=0.25)
        assert not leases.heartbeat(session, job_id=job_id, worker_id="b")
        assert not jobs.finish_job(session, job_id=job_id, worker_id="b", state="succeeded",
                                   log_line="b says done")
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.worker_id, job.progress) == ("running", "a", 0.25)
        assert jobs.finish_job(session, job_id=job_id, worker_id="a", state="failed",
                               error="ValueError: bad", log_line="a failed it")
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.error) == ("failed", "ValueError: bad")
        assert job.finished_at is not None
        logs = session.scalars(select(JobLog.message).where(JobLog.job_id == job_id)).all()
        assert logs == ["a failed it"]  # not b's line: b's finish changed nothing
    assert attempts(db_url, job_id) == [(1, "a", "failed", True)]


def test_a_finished_job_cannot_be_finished_again(db_url):
    job_id = running(db_url)
    with session_scope(db_url) as session:
        assert jobs.finish_job(session, job_id=job_id, worker_id="w", state="succeeded",
                               result={"val_loss": 0.5})
        assert not jobs.finish_job(session, job_id=job_id, worker_id="w", state="failed",
                                   error="late")
        assert not leases.heartbeat(session, job_id=job_id, worker_id="w")
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.error, job.result, job.progress) == (
            "succeeded", None, {"val_loss": 0.5}, 1.0)
    assert attempts(db_url, job_id) == [(1, "w", "succeeded", True)]


# -- cancel ------------------------------------------------------------------------------------

def test_cancel_twice_is_wrong_state(db_url):
    [job_id] = queued(db_url)
    with session_scope(db_url) as session:
        assert jobs.cancel_job(session, job_id=job_id, tenant="t").state == "canceled"
        with pytest.raises(jobs.WrongState) as again:
            jobs.cancel_job(session, job_id=job_id, tenant="t")
        assert again.value.state == "canceled" and "already canceled" in str(again.value)
        assert jobs.claim_job(session, job_id=job_id, worker_id="w") is None


def test_cancel_is_scoped_to_the_tenant(db_url):
    [job_id] = queued(db_url, tenant="owner")
    with session_scope(db_url) as session:
        with pytest.raises(job_reads.JobNotFound):
            jobs.cancel_job(session, job_id=job_id, tenant="someone-else")
        with pytest.raises(job_reads.JobNotFound):
            jobs.cancel_job(session, job_id="0" * 32, tenant=None)
    assert state_of(db_url, job_id) == "queued"


def test_a_canceled_running_job_refuses_its_worker(db_url):
    job_id = running(db_url)
    with session_scope(db_url) as session:
        jobs.cancel_job(session, job_id=job_id, tenant=None)
        assert not leases.heartbeat(session, job_id=job_id, worker_id="w")
        assert not jobs.record_epoch(session, job_id=job_id, worker_id="w", epoch=1, step=1,
                                     metrics={"val_loss": 1.0}, progress=0.5)
        assert not jobs.finish_job(session, job_id=job_id, worker_id="w", state="succeeded")
        assert jobs.requeue_expired(session, lease_seconds=30,
                                    now=utcnow() + timedelta(hours=1)) == []
    assert state_of(db_url, job_id) == "canceled"


# -- lease expiry ------------------------------------------------------------------------------

def test_expired_lease_requeues_then_fails_and_the_late_worker_cannot_write(db_url):
    [job_id] = queued(db_url)
    later = utcnow() + timedelta(seconds=31)
    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id="a") is not None
        assert jobs.claim_job(session, job_id=job_id, worker_id="b") is None  # duplicate
        assert jobs.requeue_expired(session, lease_seconds=30) == []  # lease still fresh
        assert jobs.requeue_expired(session, lease_seconds=30, now=later) == [job_id]
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.attempt, job.worker_id) == ("queued", 2, None)
        # the first worker wakes up: every write it tries is refused
        assert not leases.heartbeat(session, job_id=job_id, worker_id="a")
        assert not jobs.record_epoch(session, job_id=job_id, worker_id="a", epoch=1, step=1,
                                     metrics={"val_loss": 1.0}, progress=0.5)
        assert not jobs.finish_job(session, job_id=job_id, worker_id="a", state="succeeded")

        assert jobs.claim_job(session, job_id=job_id, worker_id="b") is not None
        assert jobs.requeue_expired(session, lease_seconds=30,
                                    now=utcnow() + timedelta(seconds=31)) == []
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert job.state == "failed" and "max_attempts (2)" in (job.error or "")
        assert session.scalar(select(func.count()).select_from(Metric)
                              .where(Metric.job_id == job_id)) == 0


def test_a_late_worker_cannot_finish_a_job_that_was_requeued(db_url):
    """Worker a's lease expired and b runs the next attempt: a's finish neither ends the job
    nor touches b's attempt; b's finish does."""
    [job_id] = queued(db_url, max_attempts=3)
    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id="a") is not None
        assert jobs.requeue_expired(session, lease_seconds=30,
                                    now=utcnow() + timedelta(seconds=31)) == [job_id]
        assert jobs.claim_job(session, job_id=job_id, worker_id="b") is not None
        assert not jobs.finish_job(session, job_id=job_id, worker_id="a", state="failed",
                                   error="a's stale error", log_line="a finished it")
        assert job_reads.job_state(session, job_id=job_id) == "running"
        assert leases.heartbeat(session, job_id=job_id, worker_id="b")
        assert jobs.finish_job(session, job_id=job_id, worker_id="b", state="succeeded")
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.attempt, job.error) == ("succeeded", 2, None)
        logs = session.scalars(select(JobLog.message).where(JobLog.job_id == job_id)).all()
        assert "a finished it" not in logs
    assert attempts(db_url, job_id) == [(1, "a", "lease_expired", True),
                                        (2, "b", "succeeded", True)]


def test_a_retried_epoch_write_records_each_metric_once(db_url):
    job_id = running(db_url)
    with session_scope(db_url) as session:
        for _ in range(2):  # the reply to the first commit was lost; the worker retries
            assert jobs.record_epoch(session, job_id=job_id, worker_id="w", epoch=1, step=4,
                                     metrics={"train_loss": 0.5, "val_loss": 0.6},
                                     progress=0.5)
        rows = session.execute(select(Metric.name, Metric.epoch).where(Metric.job_id == job_id)
                               .order_by(Metric.name)).all()
        assert rows == [("train_loss", 1), ("val_loss", 1)]


# -- release -----------------------------------------------------------------------------------

def test_release_hands_back_only_a_job_this_worker_still_runs(db_url):
    """A stopping worker's release: queued again with attempt + 1 and max_attempts + 1; a
    second release, another worker's, or one after a cancel changes nothing and leaves the
    attempt for the caller to end as it really ended."""
    [job_id, canceled] = queued(db_url, 2)
    with session_scope(db_url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id="w") is not None
        before = job_reads.get_job(session, job_id=job_id).max_attempts
        assert not jobs.release_job(session, job_id=job_id, worker_id="other")
        assert jobs.release_job(session, job_id=job_id, worker_id="w")
        assert not jobs.release_job(session, job_id=job_id, worker_id="w")
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.attempt, job.max_attempts, job.worker_id) == (
            "queued", 2, before + 1, None)
        assert session.scalars(select(JobAttempt.outcome).where(
            JobAttempt.job_id == job_id)).all() == ["released"]

        assert jobs.claim_job(session, job_id=canceled, worker_id="w") is not None
        jobs.cancel_job(session, job_id=canceled, tenant=None)
        assert not jobs.release_job(session, job_id=canceled, worker_id="w")
        attempt = session.scalars(select(JobAttempt).where(JobAttempt.job_id == canceled)).one()
        assert attempt.ended_at is None  # not marked "lost": the runner records "canceled"
        assert job_reads.job_state(session, job_id=canceled) == "canceled"


# -- storage errors ----------------------------------------------------------------------------

def test_storage_error_requeues_after_the_backoff_then_fails_past_max_attempts(db_url):
    job_id = running(db_url, "a", max_attempts=2)
    with session_scope(db_url) as session:
        before = utcnow()
        assert jobs.retry_after_storage_error(session, job_id=job_id, worker_id="a",
                                              error="disk full", backoff_seconds=60) == "retry"
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.attempt, job.max_attempts, job.worker_id) == (
            "queued", 2, 2, None)
        assert job.enqueued_at >= before + timedelta(seconds=59)  # not resent before it is due
        # the old holder is stopped: nothing of it can write now
        assert jobs.retry_after_storage_error(session, job_id=job_id, worker_id="a",
                                              error="disk full", backoff_seconds=60) == "stopped"
        assert jobs.claim_job(session, job_id=job_id, worker_id="b") is not None
        assert jobs.retry_after_storage_error(session, job_id=job_id, worker_id="b",
                                              error="disk full", backoff_seconds=60) == "failed"
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.error) == ("failed", "disk full (on each of 2 attempts)")
        assert jobs.claim_job(session, job_id=job_id, worker_id="c") is None
    assert attempts(db_url, job_id) == [(1, "a", "store_error", True),
                                        (2, "b", "store_error", True)]


def test_storage_error_after_a_cancel_stops_and_keeps_the_cancel(db_url):
    job_id = running(db_url)
    with session_scope(db_url) as session:
        jobs.cancel_job(session, job_id=job_id, tenant=None)
        assert jobs.retry_after_storage_error(session, job_id=job_id, worker_id="w",
                                              error="read-only", backoff_seconds=1) == "stopped"
    assert state_of(db_url, job_id) == "canceled"
    assert attempts(db_url, job_id) == [(1, "w", "canceled", True)]
