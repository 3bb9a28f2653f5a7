"""Many rows at once, for filling a database to a size (bench/bench_scale.py): PostgreSQL's
COPY through the session's own connection, committed with the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy.orm import Session

from db.tables import Artifact, Job, JobAttempt, Metric

# the columns each loader takes, in the order of its row tuples
JOB_COLUMNS = ("id", "tenant", "kind", "name", "state", "request", "summary", "result",
               "error", "progress", "attempt", "max_attempts", "worker_id", "heartbeat_at",
               "enqueued_at", "created_at", "started_at", "finished_at", "updated_at",
               "timeout_seconds")
METRIC_COLUMNS = ("job_id", "name", "step", "epoch", "value", "created_at")
ARTIFACT_COLUMNS = ("job_id", "tenant", "kind", "name", "key", "size", "sha256", "meta",
                    "created_at")
ATTEMPT_COLUMNS = ("job_id", "attempt", "worker_id", "started_at", "ended_at", "outcome",
                   "device", "error")


def copy_rows(session: Session, table: str, columns: Sequence[str],
              rows: Iterable[Sequence[Any]]) -> int:
    """COPY `rows` (tuples in the order of `columns`; JSON columns as JSON text) into the
    table; returns how many. PostgreSQL only: one statement streams them all, where
    executemany would cost a round trip per batch and the ORM an object per row."""
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        raise NotImplementedError("bulk COPY needs PostgreSQL")
    raw = conn.connection.dbapi_connection
    assert raw is not None
    n = 0
    with raw.cursor() as cur, cur.copy(  # type: ignore[attr-defined]
            f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
            n += 1
    return n


def jobs(session: Session, rows: Iterable[Sequence[Any]]) -> int:
    return copy_rows(session, Job.__tablename__, JOB_COLUMNS, rows)


def metrics(session: Session, rows: Iterable[Sequence[Any]]) -> int:
    return copy_rows(session, Metric.__tablename__, METRIC_COLUMNS, rows)


def artifacts(session: Session, rows: Iterable[Sequence[Any]]) -> int:
    return copy_rows(session, Artifact.__tablename__, ARTIFACT_COLUMNS, rows)


def attempts(session: Session, rows: Iterable[Sequence[Any]]) -> int:
    return copy_rows(session, JobAttempt.__tablename__, ATTEMPT_COLUMNS, rows)
