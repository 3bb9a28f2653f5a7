"""The workers table on SQLite and PostgreSQL: a report upserts the worker's row, a touch
refreshes it, the live ones are those seen within the window, stopping workers read no
queue, old rows are purged; and the waiting reasons computed from it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from api import waiting
from convoy.settings import Settings
from db import jobs
from db import workers as workers_db
from db.base import utcnow
from db.migrate import upgrade
from db.session import get_engine, session_scope
from db.tables import Job, Worker
from tests.services import create_pg_database, drop_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        found = f"sqlite:///{tmp_path / 'convoy.db'}"
        upgrade(found)
        yield found
        return
    found = create_pg_database()
    upgrade(found)
    try:
        yield found
    finally:
        get_engine(found).dispose()
        drop_pg_database(found)


def report(url: str, worker_id: str, *, queues: list[str], state: str = "idle",
           job: str | None = None, started: bool = False) -> None:
    with session_scope(url) as session:
        workers_db.report(session, worker_id=worker_id, host="h", pid=1, devices=["cpu"],
                          queues=queues, state=state, current_job=job,
                          started_at=utcnow() if started else None)


def test_report_upserts_touch_refreshes_and_the_window_decides(url: str) -> None:
    report(url, "a", queues=["q"], started=True)
    with session_scope(url) as session:
        first = session.get(Worker, "a")
        assert first is not None
        started, seen = first.started_at, first.last_seen
    report(url, "a", queues=["q", "q-gpu"], state="busy", job="j1")
    report(url, "b", queues=["q"], state="stopping", started=True)
    with session_scope(url) as session:
        workers_db.touch(session, worker_id="a", current_job="j2")
    with session_scope(url) as session:
        a = session.get(Worker, "a", populate_existing=True)
        assert a is not None
        assert (a.state, a.current_job, a.queues) == ("busy", "j2", ["q", "q-gpu"])
        assert a.started_at == started and a.last_seen >= seen  # started_at kept
        assert [w.id for w in workers_db.seen_since(session, within_seconds=60)] == ["a", "b"]
        # a stopping worker takes nothing new: it counts for no queue
        assert workers_db.live_queues(session, within_seconds=60) == {"q": 1, "q-gpu": 1}
        session.execute(update(Worker).where(Worker.id == "a")
                        .values(last_seen=utcnow() - timedelta(seconds=120)))
        session.commit()
        assert [w.id for w in workers_db.seen_since(session, within_seconds=60)] == ["b"]
        assert workers_db.live_queues(session, within_seconds=60) == {}
        assert workers_db.purge(session, unseen_seconds=100) == 1
        assert workers_db.count_all(session) == 1


def test_waiting_reasons_name_the_queue_the_device_and_the_tenant_limit(url: str) -> None:
    settings = Settings(database_url=url, queue="q", max_running_per_tenant=1,
                        worker_seen_seconds=60)
    with session_scope(url) as session:
        made = {name: jobs.create_job(session, tenant=tenant, kind="train", name=name,
                                      request={"device": device}, summary=None,
                                      max_attempts=1).id
                for name, tenant, device in (("cpu", "t", "cpu"), ("gpu", "t", "cuda"),
                                             ("busy", "u", "auto"), ("running", "u", None))}
        session.commit()
        session.execute(update(Job).where(Job.id == made["running"]).values(state="running"))
        session.commit()
        asked = [(made[n], t, d, 1) for n, t, d in (("cpu", "t", "cpu"), ("gpu", "t", "cuda"),
                                                 ("busy", "u", "auto"))]
        nobody = waiting.reasons(session, settings, asked)
    assert [c for c, _ in nobody[made["cpu"]]] == [waiting.NO_WORKER]
    assert "no live worker reads its queue q " in nobody[made["cpu"]][0][1]
    assert [c for c, _ in nobody[made["gpu"]]] == [waiting.NO_GPU_WORKER]
    assert "q-gpu" in nobody[made["gpu"]][0][1]
    assert [c for c, _ in nobody[made["busy"]]] == [waiting.NO_WORKER, waiting.TENANT_LIMIT]
    report(url, "w", queues=["q"])
    with session_scope(url) as session:
        some = waiting.reasons(session, settings, asked)
    assert made["cpu"] not in some  # nothing holds it up now
    assert [c for c, _ in some[made["gpu"]]] == [waiting.NO_GPU_WORKER]
    assert waiting.reason_text(some[made["busy"]]) == (
        "its tenant is at its running limit (1 running, max_running_per_tenant=1)")


def test_a_job_asking_for_more_devices_than_any_worker_owns_says_so(url: str) -> None:
    settings = Settings(database_url=url, queue="q", worker_seen_seconds=60)
    with session_scope(url) as session:
        made = {n: jobs.create_job(session, tenant="t", kind="train", name=str(n),
                                   request={"device": "cpu", "resources": {"devices": n}},
                                   summary=None, max_attempts=1).id for n in (2, 3, 4)}
        session.commit()
    asked = [(made[n], "t", "cpu", n) for n in (2, 3, 4)]
    report(url, "two", queues=["q", "q-x2"])
    with session_scope(url) as session:
        found = waiting.reasons(session, settings, asked)
    assert made[2] not in found
    for n in (3, 4):
        assert [c for c, _ in found[made[n]]] == [waiting.TOO_FEW_DEVICES]
        assert (f"it asks for {n} devices and no live worker owns that many (the most: 2); "
                f"it starts when a worker owning {n} reads q-x{n}") == found[made[n]][0][1]
    report(url, "four", queues=["q", "q-x2", "q-x3", "q-x4"])
    with session_scope(url) as session:
        assert waiting.reasons(session, settings, asked) == {}
