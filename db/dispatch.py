"""Sending queued jobs to the broker: which queued jobs the reconciler sends again (their
message may be lost), where a job's message goes, and when it was last sent."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.base import utcnow
from db.states import JobState
from db.tables import Job


def stale_queued(
    session: Session,
    *,
    older_than_seconds: float,
    now: datetime | None = None,
    max_backoff_seconds: float | None = None,
    limit: int = 1000,
) -> list[tuple[str, str]]:
    """(id, kind) of queued jobs not sent for `older_than_seconds`: their message may be lost.

    With `max_backoff_seconds`, a job is resent only after waiting at least as long as it had
    already waited when it was last sent (capped): 30 s, 60 s, 120 s... after submission. A
    long backlog then costs a few duplicate messages per job instead of one every pass. Marks
    nothing: call mark_sent for the ids actually sent."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=older_than_seconds)
    rows = session.execute(
        select(Job.id, Job.kind, Job.created_at, Job.enqueued_at)
        .where(Job.state == JobState.QUEUED, Job.enqueued_at < cutoff)
        .order_by(Job.enqueued_at)
        .limit(limit)
    ).all()
    session.commit()
    due: list[tuple[str, str]] = []
    for job_id, kind, created_at, enqueued_at in rows:
        if max_backoff_seconds is not None and enqueued_at is not None:  # (never None here)
            waited_before = min((enqueued_at - created_at).total_seconds(), max_backoff_seconds)
            if (now - enqueued_at).total_seconds() < waited_before:
                continue
        due.append((job_id, kind))
    return due


def count_queued(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job)
                          .where(Job.state == JobState.QUEUED)) or 0


@dataclass(frozen=True)
class Route:
    """What a job's message is sent as (kind), where (the device and the device count decide
    the queue: convoy.queue.queue_for) and with what priority (0..9)."""
    kind: str
    device: str | None
    priority: int
    devices: int = 1


def _priority(request: dict[str, Any] | None) -> int:
    value = (request or {}).get("priority")
    # jobs submitted before priorities existed have none: the default, 5
    return value if type(value) is int and 0 <= value <= 9 else 5


def devices_of(request: dict[str, object] | None) -> int:
    """The device count a stored train request asks for (resources.devices; 1 by default)."""
    resources = (request or {}).get("resources")
    count = resources.get("devices") if isinstance(resources, dict) else None
    return count if isinstance(count, int) and count >= 1 else 1


def routes_of(session: Session, *, job_ids: Iterable[str]) -> dict[str, Route]:
    """id -> Route: everything a message for the job needs, read from its request."""
    ids = list(job_ids)
    if not ids:
        return {}
    rows = session.execute(select(Job.id, Job.kind, Job.request).where(Job.id.in_(ids)))
    return {i: Route(kind, (request or {}).get("device"), _priority(request),
                     devices_of(request))
            for i, kind, request in rows}


def mark_sent(session: Session, *, job_ids: Iterable[str], now: datetime | None = None) -> None:
    ids = list(job_ids)
    if ids:
        session.execute(
            update(Job).where(Job.id.in_(ids), Job.state == JobState.QUEUED)
            .values(enqueued_at=now or utcnow())
            .execution_options(synchronize_session=False)
        )
    session.commit()
