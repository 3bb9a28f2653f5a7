"""A job's metric points: written per epoch with its progress (db.jobs.record_epoch), read as
series by GET /v1/jobs/{id}/metrics and as new points by the event stream."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.tables import Metric


def add_step(session: Session, *, job_id: str, step: int, epoch: int,
             values: Mapping[str, float]) -> None:
    """Add the step's points; committed with the caller's transaction. A retried call (the
    commit went through but the reply was lost to a dropped connection) must not trip the
    unique constraint: the names this step already has are skipped."""
    have = set(session.scalars(select(Metric.name).where(Metric.job_id == job_id,
                                                         Metric.step == step)))
    for name, value in values.items():
        if name not in have:
            session.add(Metric(job_id=job_id, name=name, step=step, epoch=epoch,
                               value=float(value)))


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
