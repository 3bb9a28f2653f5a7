"""The lease history: one JobAttempt row per claim of a job by a worker."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.tables import JobAttempt


def end(session: Session, *, job_id: str, worker_id: str, outcome: str) -> None:
    """Close the worker's open attempt of the job; committed with the caller's transaction."""
    session.execute(
        update(JobAttempt)
        .where(
            JobAttempt.job_id == job_id,
            JobAttempt.worker_id == worker_id,
            JobAttempt.ended_at.is_(None),
        )
        .values(ended_at=utcnow(), outcome=outcome)
        .execution_options(synchronize_session=False)
    )


def of_job(session: Session, *, job_id: str) -> list[JobAttempt]:
    """The job's attempts in order (the caller has checked the job is the tenant's)."""
    return list(session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id)
                                .order_by(JobAttempt.attempt, JobAttempt.id)))
