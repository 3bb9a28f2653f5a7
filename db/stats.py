"""Counts for /metrics, read from the database at scrape time: they are the same from every
API process, and they count what workers in other processes did."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Float, case, cast, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from db.states import TERMINAL_STATES
from db.tables import Job


def jobs_by_state(session: Session) -> dict[str, int]:
    return {str(state): n for state, n in session.execute(
        select(Job.state, func.count()).group_by(Job.state))}


def submitted_by_kind(session: Session) -> dict[str, int]:
    """Every job ever submitted (a job row is never deleted), by kind."""
    return {kind: n for kind, n in session.execute(
        select(Job.kind, func.count()).group_by(Job.kind))}


def finished_by_kind_state(session: Session) -> dict[tuple[str, str], int]:
    return {(kind, str(state)): n for kind, state, n in session.execute(
        select(Job.kind, Job.state, func.count())
        .where(Job.state.in_(TERMINAL_STATES)).group_by(Job.kind, Job.state))}


@dataclass(frozen=True)
class Histogram:
    """Cumulative counts per upper bound (the same order as the bounds), count and sum."""

    buckets: list[int]
    count: int
    sum: float


def _seconds(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", end - start), Float)
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _histogram(session: Session, start: InstrumentedAttribute[Any],
               end: InstrumentedAttribute[Any], bounds: Sequence[float],
               *where: ColumnElement[bool]) -> Histogram:
    # Each row's duration once (a MATERIALIZED CTE: not inlined into every bucket's CASE,
    # where SQLite would compute it once per bucket), then one pass over them.
    durations = (select(_seconds(session, start, end).label("s"))
                 .where(start.is_not(None), end.is_not(None), *where)
                 .cte("durations").prefix_with("MATERIALIZED"))
    secs = durations.c.s
    columns: list[ColumnElement[Any]] = [func.count(), func.coalesce(func.sum(secs), 0.0)]
    columns += [func.coalesce(func.sum(case((secs <= b, 1), else_=0)), 0) for b in bounds]
    row = session.execute(select(*columns).select_from(durations)).one()
    return Histogram(buckets=[int(n) for n in row[2:]], count=int(row[0]), sum=float(row[1]))


def queue_wait(session: Session, bounds: Sequence[float]) -> Histogram:
    """From submission to the first claim, for every job that started."""
    return _histogram(session, Job.created_at, Job.started_at, bounds)


def run_time(session: Session, bounds: Sequence[float]) -> Histogram:
    """From the first claim to the end, for every job that started and ended."""
    return _histogram(session, Job.started_at, Job.finished_at, bounds,
                      Job.state.in_(TERMINAL_STATES))
