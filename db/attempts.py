"""The lease history: one JobAttempt row per claim of a job by a worker, closed with its
outcome by the worker, by a transition, or by the reconciler when its worker died."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.base import rowcount, utcnow
from db.joblog import log
from db.states import AttemptOutcome, JobState
from db.tables import Job, JobAttempt


def end(session: Session, *, job_id: str, worker_id: str, outcome: AttemptOutcome,
        error: str | None = None) -> None:
    """Close the worker's open attempt of the job (with the error it ended with, if any);
    committed with the caller's transaction."""
    session.execute(
        update(JobAttempt)
        .where(
            JobAttempt.job_id == job_id,
            JobAttempt.worker_id == worker_id,
            JobAttempt.ended_at.is_(None),
        )
        .values(ended_at=utcnow(), outcome=outcome, error=error)
        .execution_options(synchronize_session=False)
    )


def lost_count(session: Session) -> int:
    """Attempts that ended because their worker went away (lost, or its lease expired)."""
    return session.scalar(select(func.count()).select_from(JobAttempt).where(
        JobAttempt.outcome.in_((AttemptOutcome.LOST, AttemptOutcome.LEASE_EXPIRED)))) or 0


def of_job(session: Session, *, job_id: str) -> list[JobAttempt]:
    """The job's attempts in order (the caller has checked the job is the tenant's)."""
    return list(session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                .order_by(JobAttempt.attempt, JobAttempt.id)))


def close_orphaned(session: Session, *, lease_seconds: float,
                   now: datetime | None = None) -> list[tuple[str, int]]:
    """Attempt rows still open (no ended_at) whose job no longer runs under them and whose
    lease expired: the worker died without closing its attempt (say, SIGKILLed while the job
    was canceled), and nothing else ever would. Each gets ended_at and an outcome: `canceled`
    when the job was canceled (what ended the attempt), otherwise `lost`. Returns the
    (job id, attempt) pairs closed."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    rows = session.execute(
        select(JobAttempt.id, JobAttempt.job_id, JobAttempt.attempt, JobAttempt.worker_id,
               Job.state, Job.worker_id, Job.attempt, Job.heartbeat_at)
        .join(Job, Job.id == JobAttempt.job_id)
        .where(JobAttempt.ended_at.is_(None), JobAttempt.started_at < cutoff)
    ).all()
    closed: list[tuple[str, int]] = []
    for row_id, job_id, attempt, worker, state, owner, current, heartbeat_at in rows:
        if state == JobState.RUNNING and owner == worker and current == attempt:
            continue  # its own lease: requeue_expired's business
        if heartbeat_at is not None and heartbeat_at >= cutoff:
            continue  # the worker may still be stopping and close it itself
        outcome = AttemptOutcome.CANCELED if state == JobState.CANCELED else AttemptOutcome.LOST
        done = rowcount(session.execute(
            update(JobAttempt).where(JobAttempt.id == row_id, JobAttempt.ended_at.is_(None))
            .values(ended_at=now, outcome=outcome,
                    error="the worker never ended the attempt")
            .execution_options(synchronize_session=False)
        )) == 1
        if done:
            seen = heartbeat_at.isoformat(timespec="seconds") if heartbeat_at else "never"
            log(session, job_id=job_id, level="warning",
                message=f"attempt {attempt} of worker {worker} closed as {outcome}: the job is "
                        f"{state} and the worker never ended the attempt (last heartbeat "
                        f"{seen})")
            closed.append((job_id, attempt))
    session.commit()
    return closed
