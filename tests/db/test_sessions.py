"""The autocommit read sessions share the request pool with the write sessions: a connection
a read used must come back to a write session in a transaction again."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from db.session import get_engine, get_read_sessionmaker, get_side_sessionmaker, session_scope
from tests.services import create_pg_database, drop_pg_database


@pytest.fixture()
def url() -> Iterator[str]:
    url = create_pg_database()  # its own: get_engine(url) starts with an empty pool
    yield url
    get_engine(url).dispose()
    drop_pg_database(url)


def in_transaction(session) -> bool:  # type: ignore[no-untyped-def]
    # now() is the transaction's start: equal across statements only inside one transaction
    first = session.execute(text("SELECT now()")).scalar()
    session.execute(text("SELECT pg_sleep(0.01)"))
    return session.execute(text("SELECT now()")).scalar() == first


def test_read_sessions_autocommit_and_the_pool_gives_write_sessions_transactions(url):
    with session_scope(url) as session:
        session.execute(text("CREATE TABLE t (x int)"))
    for _ in range(3):  # one pooled connection goes read, write, read, write...
        with get_read_sessionmaker(url)() as read:
            assert not in_transaction(read)
            raw = read.connection().connection.dbapi_connection
        with pytest.raises(RuntimeError), session_scope(url) as write:
            assert write.connection().connection.dbapi_connection is raw  # the same one
            assert in_transaction(write)
            write.execute(text("INSERT INTO t VALUES (1)"))
            raise RuntimeError("rolled back")
    with session_scope(url) as session:
        assert session.execute(text("SELECT count(*) FROM t")).scalar() == 0
    with get_side_sessionmaker(url, "auth")() as side:
        assert not in_transaction(side)


def test_a_pooled_connection_the_server_closed_is_replaced_without_a_ping(url):
    """db.session._closed_by_server: the pool asks the socket, not the server, whether an idle
    connection still lives (no `SELECT 1` at checkout); one whose backend was terminated (as
    in a restart) is replaced, and the next statement works."""
    from sqlalchemy import event

    engine = get_engine(url)
    sent: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: sent.append(a[2]))
    with engine.connect() as conn:
        first = conn.execute(text("SELECT pg_backend_pid()")).scalar()
    with engine.connect() as conn:  # the same pooled connection, checked out without a ping
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar() == first
    assert sent == ["SELECT pg_backend_pid()"] * 2
    held = engine.connect()
    assert held.execute(text("SELECT pg_backend_pid()")).scalar() == first
    with engine.connect() as other:  # a second connection ends the first one's backend
        held.close()  # while it is idle in the pool
        assert other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": first}).scalar()
        # The backend goes away just after the call. Waited for on `other`, which stays
        # checked out: a checkout here could take the first connection before its backend
        # has gone, pass the socket check, and fail on its statement.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and other.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"),
                {"p": first}).scalar():
            time.sleep(0.05)
    for _ in range(3):  # whichever pooled connection comes out, it works
        with engine.connect() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar() != first
