"""A job's metric points: written per epoch with its progress (db.jobs.record_epoch), read as
series by GET /v1/jobs/{id}/metrics and as new points by the event stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.base import upsert_statement, utcnow
from db.tables import Metric


def put_step(session: Session, *, job_id: str, step: int, epoch: int,
             values: Mapping[str, float]) -> None:
    """The step's points as one multi-row INSERT (no ORM objects, no flush); committed with
    the caller's transaction. A point the step already has is overwritten: a retried commit
    (the reply lost to a dropped connection) writes nothing twice, and a resumed attempt that
    trains the epoch again records its own values."""
    if not values:
        return
    now = utcnow()
    rows = [{"job_id": job_id, "name": name, "step": step, "epoch": epoch,
             "value": float(value), "created_at": now} for name, value in values.items()]
    # one statement compiled once (executemany: a single INSERT .. VALUES round trip)
    session.connection().execute(_put_statement(session), rows)


def _put_statement(session: Session) -> Any:
    insert = upsert_statement(session, Metric.__table__)
    return insert.on_conflict_do_update(
        index_elements=["job_id", "name", "step"],
        set_={"epoch": insert.excluded.epoch, "value": insert.excluded.value})


def series(session: Session, *, job_id: str, name: str | None = None) -> list[Metric]:
    """The job's points (or those of one metric) by name, then step (the caller has checked
    the job is the tenant's)."""
    query = select(Metric).where(Metric.job_id == job_id)
    if name:
        query = query.where(Metric.name == name)
    return list(session.scalars(query.order_by(Metric.name, Metric.step)))


def after(session: Session, *, job_id: str, after_id: int) -> list[Metric]:
    """The job's points written after the point `after_id`, in the order written."""
    return list(session.scalars(
        select(Metric).where(Metric.job_id == job_id, Metric.id > after_id)
        .order_by(Metric.id)))


def last_epoch(session: Session, *, job_id: str) -> tuple[int, dict[str, float]] | None:
    """The job's last recorded epoch and its values by name, or None before any."""
    epoch = session.scalar(select(func.max(Metric.epoch)).where(Metric.job_id == job_id))
    if epoch is None:
        return None
    rows = session.execute(select(Metric.name, Metric.value).where(
        Metric.job_id == job_id, Metric.epoch == epoch)).all()
    return int(epoch), {name: float(value) for name, value in rows}
