"""A migrated PostgreSQL database of the db tests' own, without the service's processes.

Not the session's `pg_url`: that is the stack's database, and requeue_expired and its kind act
on every job in the database they are given, so they would move the stack's jobs and be moved
by its reconciler."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import update

from db.session import session_scope
from db.tables import Job


@pytest.fixture
def db_url(migrated_url: str) -> Iterator[str]:
    """The module's database; what a test leaves queued or running is canceled after it, so
    the next test's database-wide transitions (requeue_expired) see only its own jobs."""
    yield migrated_url
    with session_scope(migrated_url) as session:
        session.execute(update(Job).where(Job.state.in_(("queued", "running")))
                        .values(state="canceled"))
