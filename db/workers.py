"""The workers table: each worker process upserts its own row (on start, with each lease
heartbeat, and every heartbeat period while idle); the API lists the ones seen lately and
reads which queues have a live reader (a queued job's waiting reason)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from db.base import rowcount, utcnow
from db.tables import Worker

STATES = ("idle", "busy", "stopping")


def report(session: Session, *, worker_id: str, host: str, pid: int | None,
           devices: Sequence[str], queues: Sequence[str], state: str,
           current_job: str | None, started_at: datetime | None = None) -> None:
    """Insert or refresh the worker's row (committed with the caller's transaction)."""
    assert state in STATES, state
    now = utcnow()
    values: dict[str, Any] = {"id": worker_id, "host": host, "pid": pid,
                              "devices": list(devices), "queues": list(queues),
                              "state": state, "current_job": current_job,
                              "started_at": started_at or now, "last_seen": now}
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert(Worker).values(**values)
    changed = {k: v for k, v in values.items() if k not in ("id", "started_at")}
    if started_at is not None:  # a (re)start: the row is this process's now
        changed["started_at"] = started_at
    session.execute(stmt.on_conflict_do_update(index_elements=[Worker.id], set_=changed))


def touch(session: Session, *, worker_id: str, current_job: str) -> None:
    """A lease heartbeat: the worker is alive and busy with `current_job` (no insert: the row
    exists from the worker's start; a worker without one simply reports on its next tick)."""
    session.execute(update(Worker).where(Worker.id == worker_id)
                    .values(last_seen=utcnow(), state="busy", current_job=current_job)
                    .execution_options(synchronize_session=False))


def seen_since(session: Session, *, within_seconds: float,
               now: datetime | None = None) -> list[Worker]:
    """Workers whose last report is at most `within_seconds` old, by id."""
    cutoff = (now or utcnow()) - timedelta(seconds=within_seconds)
    return list(session.scalars(select(Worker).where(Worker.last_seen >= cutoff)
                                .order_by(Worker.id)))


def live_queues(session: Session, *, within_seconds: float) -> dict[str, int]:
    """queue -> how many live workers (seen within `within_seconds`, not stopping) read it."""
    counts: dict[str, int] = {}
    for worker in seen_since(session, within_seconds=within_seconds):
        if worker.state == "stopping":
            continue
        for queue in worker.queues or []:
            counts[queue] = counts.get(queue, 0) + 1
    return counts


def count_all(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Worker)) or 0


def purge(session: Session, *, unseen_seconds: float, now: datetime | None = None) -> int:
    """Delete the rows of workers not seen for `unseen_seconds` (each process start of a
    worker named hostname:pid leaves one); committed. Returns how many."""
    cutoff = (now or utcnow()) - timedelta(seconds=unseen_seconds)
    gone = rowcount(session.execute(delete(Worker).where(Worker.last_seen < cutoff)))
    session.commit()
    return gone
