"""A job's log lines: written beside the transitions, read by GET /v1/jobs/{id}/logs."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.tables import JobLog


def log(session: Session, *, job_id: str, message: str, level: str = "info") -> None:
    """Add a line; committed with the caller's transaction."""
    session.add(JobLog(job_id=job_id, level=level, message=message))


def lines(session: Session, *, job_id: str) -> list[JobLog]:
    """The job's lines, oldest first (the caller has checked the job is the tenant's)."""
    return list(session.scalars(select(JobLog).where(JobLog.job_id == job_id)
                                .order_by(JobLog.id)))
