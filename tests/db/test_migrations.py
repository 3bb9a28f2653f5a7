"""Alembic migrations on SQLite and PostgreSQL: up, all the way down, up again, and the
migrated schema equals what db.tables declares (autogenerate finds nothing to add)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from db import tables  # noqa: F401  (registers the tables on Base.metadata)
from db.base import Base
from db.migrate import alembic_config, downgrade, upgrade
from tests.services import create_pg_database, drop_pg_database

TABLES = {"tokens", "jobs", "job_attempts", "metrics", "job_logs", "artifacts", "uploads",
          "idempotency_keys", "workers", "webhook_endpoints", "webhook_deliveries",
          "webhook_attempts", "sweeps", "sweep_trials"}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'convoy.db'}"
        return
    pg = create_pg_database()
    try:
        yield pg
    finally:
        drop_pg_database(pg)


def schema_diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_and_schema_matches_the_tables(url):
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()

    upgrade(url)
    assert current_revision(url) == head
    assert table_names(url) == TABLES
    assert schema_diff(url) == []

    downgrade(url, "base")
    assert current_revision(url) is None
    assert table_names(url) == set()

    upgrade(url)
    assert current_revision(url) == head
    assert table_names(url) == TABLES
    assert schema_diff(url) == []
    # a second upgrade at head is a no-op, as `convoy db upgrade` on every start relies on
    upgrade(url)
    assert current_revision(url) == head

    # the comparison is not vacuous: a schema missing one index is seen as different
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_jobs_state_enqueued"))
    engine.dispose()
    assert [d[0] for d in schema_diff(url)] == ["add_index"]


def test_every_revision_steps_down_and_up_one_at_a_time(url):
    script = ScriptDirectory.from_config(alembic_config(url))
    revisions = [r.revision for r in script.walk_revisions("base", "heads")][::-1]
    for rev in revisions:
        upgrade(url, rev)
        assert current_revision(url) == rev
    for rev in reversed(revisions):
        downgrade(url, "-1")
        assert current_revision(url) == script.get_revision(rev).down_revision
    assert table_names(url) == set()
