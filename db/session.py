"""Engine and session factory, one per database URL per process."""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

from db.jsontext import loads_replacing

# How long a session waits for a pooled connection before sqlalchemy.exc.TimeoutError (the
# API answers 503): short, so nothing stalls for SQLAlchemy's default 30 s. The API sets it
# from CONVOY_DB_POOL_TIMEOUT_SECONDS at start-up (configure_pools), before any engine exists.
_POOL = {"timeout": 5.0}


def configure_pools(*, timeout_seconds: float) -> None:
    """Set the pool timeout of engines made from now on (call at process start-up)."""
    _POOL["timeout"] = timeout_seconds


# The request pool's size per database kind: (pool_size, max_overflow).
POOL_SQLITE = (5, 10)
POOL_POSTGRES = (10, 20)


def _make_engine(url: str, *, pool_size: int, max_overflow: int, timeout: float,
                 busy_timeout: float = 30, connect_timeout: int | None = None) -> Engine:
    if url.startswith("sqlite"):
        # (an in-memory database gets a single-connection pool, which takes no pool options)
        pool = {} if ":memory:" in url else {"pool_timeout": timeout, "pool_size": pool_size,
                                             "max_overflow": max_overflow}
        engine = create_engine(url, connect_args={"check_same_thread": False,
                                                  "timeout": busy_timeout},
                               json_deserializer=loads_replacing, **pool)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the API read while the worker writes; FKs are off by default in SQLite.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # json_deserializer: a stored lone surrogate reads back as U+FFFD.
    connect = {} if connect_timeout is None else {"connect_timeout": connect_timeout}
    engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow,
                           pool_timeout=timeout, connect_args=connect,
                           json_deserializer=loads_replacing)
    event.listen(engine, "checkout", _closed_by_server)  # in place of pool_pre_ping
    return engine


def _closed_by_server(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
    """A PostgreSQL restart must not leave dead connections in the pool. pool_pre_ping would
    ask the server (a `SELECT 1` round trip at every checkout, several per job); this looks at
    the socket instead: an idle connection the server has closed (a restart, a terminated
    backend, an idle timeout) has something to read (the server's last message, or the end
    of the stream), a live idle one has nothing. DisconnectionError makes the pool discard the
    connection and check out a fresh one. (A silent network loss is caught by neither: the
    statement fails and, in the worker, is retried as any disconnect.)"""
    if dbapi_conn.closed or dbapi_conn.broken:
        raise DisconnectionError("the pooled connection is closed")
    try:
        poller = select.poll()
        poller.register(dbapi_conn.pgconn.socket, select.POLLIN)
        readable = bool(poller.poll(0))
    except Exception as exc:  # noqa: BLE001 - no socket to look at: not a usable connection
        raise DisconnectionError(f"the pooled connection has no usable socket: {exc}") from exc
    if readable:
        raise DisconnectionError("the server closed the pooled connection")


@lru_cache
def get_engine(url: str) -> Engine:
    size, overflow = POOL_SQLITE if url.startswith("sqlite") else POOL_POSTGRES
    return _make_engine(url, pool_size=size, max_overflow=overflow, timeout=_POOL["timeout"])


def pool_capacity(url: str) -> int:
    """How many connections get_engine(url) may hold at once."""
    size, overflow = POOL_SQLITE if url.startswith("sqlite") else POOL_POSTGRES
    return size + overflow


@lru_cache
def get_side_engine(url: str, purpose: str) -> Engine:
    """A small engine of its own (2 + 2 connections) for work that must never queue behind
    the request pool: the API's token checks and its readiness probe."""
    return _make_engine(url, pool_size=2, max_overflow=2, timeout=2, busy_timeout=2,
                        connect_timeout=2)


def ping(url: str, purpose: str) -> None:
    """One trivial statement on the side engine for `purpose`; raises if the database does
    not answer."""
    with get_side_engine(url, purpose).connect() as conn:
        conn.execute(text("SELECT 1"))


@lru_cache
def get_side_sessionmaker(url: str, purpose: str) -> sessionmaker[Session]:
    """Sessions on the side engine for `purpose`, in autocommit: its work is one read."""
    return sessionmaker(_autocommit(get_side_engine(url, purpose)), expire_on_commit=False)


@lru_cache
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@lru_cache
def get_read_sessionmaker(url: str) -> sessionmaker[Session]:
    """Sessions on the request pool in autocommit, for a hot read whose statements need no
    common snapshot (GET /v1/jobs/{id}): no BEGIN before the first statement and no ROLLBACK
    when the connection goes back, two round trips fewer. Never for a write."""
    return sessionmaker(_autocommit(get_engine(url)), expire_on_commit=False)


def _autocommit(engine: Engine) -> Engine:
    # the same pool; a connection is set to autocommit at checkout and reset at checkin
    return engine.execution_options(isolation_level="AUTOCOMMIT")


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
