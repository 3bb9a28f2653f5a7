"""Shared fixtures: a real PostgreSQL database, a Redis db, and the service's processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.migrate import upgrade
from db.session import get_engine
from tests.s3server import WeedServer
from tests.services import (
    REDIS,
    Stack,
    create_pg_database,
    drop_pg_database,
    stack_env,
)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="module")
def migrated_url() -> Iterator[str]:
    """A migrated PostgreSQL database of the module's own, without the service's processes
    (the session's `pg_url` is the stack's, whose reconciler acts on every job in it)."""
    url = create_pg_database()
    upgrade(url)
    yield url
    get_engine(url).dispose()
    drop_pg_database(url)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[Stack]:
    """API + one worker on PostgreSQL and Redis, as compose runs them."""
    home = tmp_path_factory.mktemp("stack")
    env = stack_env(home, database_url=pg_url, broker_url=f"{REDIS}/0",
                    queue=f"convoy-test-{uuid.uuid4().hex[:8]}")
    s = Stack(env=env, home=Path(home))
    try:
        s.start_api()
        s.start_worker()
        yield s
    finally:
        s.stop()


@pytest.fixture
def client(stack: Stack):  # type: ignore[no-untyped-def]
    with stack.client() as c:
        yield c


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WeedServer]:
    """One real S3 server (SeaweedFS) per test session, with a bucket made for the tests."""
    server = WeedServer(tmp_path_factory.mktemp("weed"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
