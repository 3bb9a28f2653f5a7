"""The hot paths' statements read the big tables through indexes: a few thousand jobs (with
their attempts, metric points and artifacts) filled and analyzed, each hot path's db calls run
and recorded, and no plan has a sequential scan of jobs, job_attempts, metrics or artifacts.
The timings at scale are bench/bench_scale.py's."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from bench.bench_scale import (
    BIG,
    add_active,
    add_tokens,
    bench_settings,
    fill,
    hot_path_statements,
)
from db.base import utcnow
from db.migrate import upgrade
from db.plans import Statement, explain, nodes, outline, seq_scans
from db.session import get_engine
from tests.services import create_pg_database, drop_pg_database

BIG_TABLES = {"jobs", "job_attempts", "metrics", "artifacts"}
JOBS = 5000


@pytest.fixture(scope="module")
def filled() -> Iterator[tuple[str, list[tuple[str, Statement]]]]:
    url = create_pg_database()
    try:
        upgrade(url)
        add_tokens(url)
        now = utcnow()
        # the big tenants' active jobs only: with 200 open attempts against 5,000 jobs a hash
        # join over all jobs is rightly cheaper than 200 lookups (the bench shows the
        # reconciler's plan at 1,000,000 jobs)
        add_active(url, now, tenants=BIG)
        ids: dict[str, list[str]] = {t: [] for t in BIG}
        fill(url, start=0, stop=JOBS, now=now, rng=random.Random(1), ids=ids)
        tenant = BIG[0]
        statements = hot_path_statements(
            url, bench_settings(url, "plans"), tenant=tenant, job_id=ids[tenant][0])
        yield url, statements
    finally:
        get_engine(url).dispose()
        drop_pg_database(url)


LABELS = ["job read (token)", "job read (tenant)", "list page", "list page (rare state)",
          "waiting reasons", "metrics", "storage quota", "submission", "claim", "reconciler"]


def test_every_hot_path_was_recorded(filled):
    _, statements = filled
    assert sorted({label for label, _ in statements}) == sorted(LABELS)


@pytest.mark.parametrize("label", LABELS)
def test_no_sequential_scan_of_a_big_table(filled, label):
    url, statements = filled
    engine = get_engine(url)
    for _, statement in [s for s in statements if s[0] == label]:
        plan = explain(engine, statement)
        assert seq_scans(plan, BIG_TABLES) == [], \
            f"{label}: {outline(plan)}\n{statement.sql}"


def test_the_list_page_starts_at_the_cursor_in_its_index(filled):
    """The cursor is an index condition (the scan starts there), not a filter applied to
    every newer job of the tenant, and the index gives the order (no sort of the tenant's
    jobs in that state): halfway down a list of a few hundred, as at any depth of millions."""
    url, statements = filled
    (statement,) = [s for label, s in statements if label == "list page"]
    plan = explain(get_engine(url), statement)
    scans = [n for n in nodes(plan) if n.get("Index Name") == "ix_jobs_tenant_state_created"]
    assert scans, outline(plan)
    assert "created_at <=" in scans[0].get("Index Cond", ""), scans[0]
    assert not [n for n in nodes(plan) if n["Node Type"] == "Sort"], outline(plan)


def test_the_plan_check_sees_a_sequential_scan(filled):
    """Not vacuous: a query with no usable index is reported."""
    url, _ = filled
    plan = explain(get_engine(url), Statement("SELECT count(*) FROM metrics WHERE value > 0",
                                              {}))
    assert seq_scans(plan, BIG_TABLES) == ["metrics"]
