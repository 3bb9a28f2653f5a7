"""Sending queued jobs to the broker, and the reconciler's passes over the lease table:
expired leases requeued (or failed past max_attempts), attempt rows nobody closed, queued jobs
whose message may be lost (stale_queued, then mark_sent for the ids actually sent)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db import attempts
from db.base import utcnow
from db.joblog import log
from db.tables import Job, JobAttempt


def requeue_expired(
    session: Session, *, lease_seconds: float, now: datetime | None = None
) -> list[str]:
    """Running jobs whose lease expired go back to queued with attempt + 1, or fail past
    max_attempts. Returns the ids that were requeued (to be enqueued again)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    expired = session.execute(
        select(Job.id, Job.attempt, Job.max_attempts, Job.worker_id).where(
            Job.state == "running", Job.heartbeat_at < cutoff
        )
    ).all()
    requeued: list[str] = []
    for job_id, attempt, max_attempts, worker_id in expired:
        stale = (Job.id == job_id) & (Job.state == "running") & (Job.heartbeat_at < cutoff)
        if attempt >= max_attempts:
            values: dict[str, Any] = {
                "state": "failed",
                "finished_at": now,
                "updated_at": now,
                "error": f"worker {worker_id} was lost and the job reached max_attempts "
                f"({max_attempts})",
            }
        else:
            values = {
                "state": "queued",
                "attempt": attempt + 1,
                "worker_id": None,
                "enqueued_at": now,
                "updated_at": now,
            }
        done = session.execute(
            update(Job).where(stale).values(**values).execution_options(synchronize_session=False)
        ).rowcount == 1  # type: ignore[attr-defined]
        if done:
            attempts.end(session, job_id=job_id, worker_id=worker_id or "", outcome="lease_expired")
            log(session, job_id=job_id, level="warning",
                message=f"lease of worker {worker_id} expired on attempt {attempt}")
            if values["state"] == "queued":
                requeued.append(job_id)
    session.commit()
    return requeued


def close_orphaned_attempts(session: Session, *, lease_seconds: float,
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
        if state == "running" and owner == worker and current == attempt:
            continue  # its own lease: requeue_expired's business
        if heartbeat_at is not None and heartbeat_at >= cutoff:
            continue  # the worker may still be stopping and close it itself
        outcome = "canceled" if state == "canceled" else "lost"
        done = session.execute(
            update(JobAttempt).where(JobAttempt.id == row_id, JobAttempt.ended_at.is_(None))
            .values(ended_at=now, outcome=outcome)
            .execution_options(synchronize_session=False)
        ).rowcount == 1  # type: ignore[attr-defined]
        if done:
            seen = heartbeat_at.isoformat(timespec="seconds") if heartbeat_at else "never"
            log(session, job_id=job_id, level="warning",
                message=f"attempt {attempt} of worker {worker} closed as {outcome}: the job is "
                        f"{state} and the worker never ended the attempt (last heartbeat "
                        f"{seen})")
            closed.append((job_id, attempt))
    session.commit()
    return closed


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
        .where(Job.state == "queued", Job.enqueued_at < cutoff)
        .order_by(Job.enqueued_at)
        .limit(limit)
    ).all()
    session.commit()
    due: list[tuple[str, str]] = []
    for job_id, kind, created_at, enqueued_at in rows:
        if max_backoff_seconds is not None:
            waited_before = min((enqueued_at - created_at).total_seconds(), max_backoff_seconds)
            if (now - enqueued_at).total_seconds() < waited_before:
                continue
        due.append((job_id, kind))
    return due


def count_queued(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job).where(Job.state == "queued")) or 0


def routes_of(session: Session, *, job_ids: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """id -> (kind, needs a GPU): what a message for the job is sent as, and to which queue."""
    ids = list(job_ids)
    if not ids:
        return {}
    rows = session.execute(select(Job.id, Job.kind, Job.request).where(Job.id.in_(ids)))
    return {i: (kind, (request or {}).get("device") == "cuda") for i, kind, request in rows}


def mark_sent(session: Session, *, job_ids: Iterable[str], now: datetime | None = None) -> None:
    ids = list(job_ids)
    if ids:
        session.execute(
            update(Job).where(Job.id.in_(ids), Job.state == "queued")
            .values(enqueued_at=now or utcnow())
            .execution_options(synchronize_session=False)
        )
    session.commit()
