"""A worker's lease on a running job: the condition every lease holder's write carries, its
renewal, and the read-only check between renewals."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.base import rowcount, utcnow
from db.states import JobState
from db.tables import Job


def owned(job_id: str, worker_id: str) -> Any:
    """The WHERE clause of a write only the lease holder may make."""
    return (Job.id == job_id) & (Job.state == JobState.RUNNING) & (Job.worker_id == worker_id)


def heartbeat(
    session: Session, *, job_id: str, worker_id: str, progress: float | None = None
) -> bool:
    """Renew the lease; False means it was lost (canceled, or requeued after it expired)."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = progress
    result = session.execute(
        update(Job).where(owned(job_id, worker_id)).values(**values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return rowcount(result) == 1


def holds_lease(session: Session, *, job_id: str, worker_id: str) -> bool:
    """A read-only check between renewals, so a cancel is seen within a second."""
    return session.execute(select(Job.id).where(owned(job_id, worker_id))).first() is not None
