"""The embedded broker's wake-up (convoy.brokerwake): a sent message wakes a waiting worker
through the FIFO beside the broker's SQLite file, and a lost wake-up costs only the poll."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from convoy.brokerwake import Listener, fifo_path, wake
from convoy.queue import enqueue, make_celery
from convoy.settings import Settings
from tests.reliability.infra import embedded_stack, stop_fast, tiny_job
from tests.services import Stack, wait_job


def test_the_fifo_sits_beside_an_sqlite_broker_only(tmp_path):
    assert fifo_path(f"sqla+sqlite:///{tmp_path}/broker.db") == tmp_path / "broker.db.wake"
    assert fifo_path("sqlite:////var/convoy/broker.db") == Path("/var/convoy/broker.db.wake")
    assert fifo_path("sqla+postgresql://u@host/db") is None
    assert fifo_path("sqla+sqlite://") is None  # in memory: nothing to wake across processes
    assert fifo_path("redis://127.0.0.1:6379/0") is None


def test_a_wake_up_without_a_listener_does_nothing_and_never_blocks(tmp_path):
    path = tmp_path / "broker.db.wake"
    assert wake(path) is False  # no FIFO yet
    os.mkfifo(path)
    assert wake(path) is False  # a FIFO nobody reads: ENXIO, not a blocked open
    other = tmp_path / "taken.wake"
    other.write_bytes(b"")
    assert wake(other) is False  # another kind of file under the name is never written
    assert other.read_bytes() == b""


def test_a_sent_message_wakes_the_listener_once(tmp_path):
    settings = Settings(home=tmp_path, database_url=f"sqlite:///{tmp_path / 'convoy.db'}",
                        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}", queue="wake")
    listener = Listener(fifo_path(settings.broker_url))
    try:
        assert listener.wait(0) is False  # opens the FIFO: nothing sent yet
        assert stat.S_ISFIFO((tmp_path / "broker.db.wake").stat().st_mode)
        app = make_celery(settings)
        enqueue(app, kind="train", job_id="j1")
        enqueue(app, kind="train", job_id="j2")
        # a real wait: it returns False only when the hour passed (the test's timeout first)
        assert listener.wait(3600) is True
        assert listener.wait(0) is False  # both wake-ups were read at once: one poll
    finally:
        listener.close()


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[Stack]:
    # a poll of 0.2 s keeps the lost wake-up's test short; the first test does not need it
    stack = embedded_stack(tmp_path, broker_polling_interval=0.2)
    try:
        stack.start_api()
        stack.start_worker()
        yield stack
    finally:
        stop_fast(stack)


def test_the_embedded_worker_listens_and_runs_jobs_with_or_without_a_wake_up(embedded):
    fifo = embedded.home / "broker.db.wake"
    with embedded.client() as client:
        done = wait_job(client, client.post("/v1/jobs", json=tiny_job(1)).json()["id"])
        assert done["state"] == "succeeded", done["error"]
        # the idle worker holds the FIFO open: a wake-up reaches it
        assert stat.S_ISFIFO(fifo.stat().st_mode)
        assert wake(fifo) is True
        # Lost wake-ups: the name is gone, so the API's sends wake nobody (the worker still
        # waits on the unlinked FIFO); its poll alone takes the jobs.
        fifo.unlink()
        assert wake(fifo) is False
        ids = [client.post("/v1/jobs", json=tiny_job(i)).json()["id"] for i in (2, 3)]
        polled = [wait_job(client, i) for i in ids]
        assert [p["state"] for p in polled] == ["succeeded", "succeeded"], polled
        assert not fifo.exists()  # no one made a new FIFO: the poll took them
