"""Priorities with one real worker, on Redis and on the embedded broker (kombu's SQLAlchemy
transport over SQLite): 20 priority-1 jobs queued, then one priority-9 job; it starts before
at least 18 of them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.infra import embedded_stack, make_stack, slow_job, stop_fast, tiny_job
from tests.services import REDIS, Stack, create_pg_database, drop_pg_database, wait_job


@pytest.fixture(scope="module", params=["redis", "embedded"])
def one_worker(request: pytest.FixtureRequest,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp(f"priority-{request.param}"))
    if request.param == "redis":
        url = create_pg_database()
        stack = make_stack(home, database_url=url, broker_url=f"{REDIS}/0")
    else:
        url = ""
        stack = embedded_stack(home, broker_polling_interval=0.05)
    try:
        stack.start_api()
        stack.start_worker()
        yield stack
    finally:
        stop_fast(stack)
        if url:
            drop_pg_database(url)


def started(job: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(job["started_at"])


def test_a_priority_9_job_overtakes_a_backlog_of_priority_1(one_worker):
    with one_worker.client() as client:
        # the first keeps the worker busy while the rest are submitted behind it
        body = [{**slow_job(1), "priority": 1}] + [{**tiny_job(i), "priority": 1}
                                                    for i in range(1, 20)]
        backlog = []
        for request in body:
            r = client.post("/v1/jobs", json=request)
            assert r.status_code == 201, r.text
            backlog.append(r.json()["id"])
        assert r.json()["request"]["priority"] == 1
        urgent = client.post("/v1/jobs", json={**tiny_job(99), "priority": 9})
        assert urgent.status_code == 201, urgent.text
        done = wait_job(client, urgent.json()["id"], timeout=120)
        assert done["state"] == "succeeded", done["error"]
        others = [wait_job(client, i, timeout=120) for i in backlog]
        assert all(o["state"] == "succeeded" for o in others)
        after = [o for o in others if started(o) > started(done)]
        assert len(after) >= 18, [(o["name"], o["started_at"]) for o in others]


def test_priority_is_checked_and_defaults_to_5(one_worker):
    with one_worker.client() as client:
        for bad in (10, -1, "high", 5.5):
            r = client.post("/v1/jobs", json={**tiny_job(), "priority": bad})
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"][-1] == "priority", r.text
        r = client.post("/v1/jobs", json=tiny_job())
        assert r.status_code == 201
        assert r.json()["request"]["priority"] == 5
