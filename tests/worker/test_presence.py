"""The worker's presence thread (worker.presence.Presence) on a real SQLite database: a change
to busy or idle is reported settle_seconds after it, together with whatever changed
meanwhile (a short job costs no report of its own); "stopping" is reported at once."""

from __future__ import annotations

import time
from pathlib import Path

from convoy.settings import Settings
from db.migrate import upgrade
from db.session import session_scope
from db.tables import Worker
from worker.presence import Presence


class Counted(Presence):
    def __init__(self) -> None:
        super().__init__()
        self.reports = 0

    def report(self) -> None:
        self.reports += 1  # (counted first: a test that sees the row sees the count)
        super().report()


def row(url: str) -> tuple[str, str | None]:
    with session_scope(url) as session:
        w = session.get(Worker, "w")
        assert w is not None
        return w.state, w.current_job


def wait_until(check: object, timeout: float) -> bool:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return bool(check())


def test_busy_and_idle_settle_into_one_report_and_stopping_goes_at_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'convoy.db'}"
    upgrade(url)
    presence = Counted()
    presence.settle_seconds = 1.0
    presence.start(Settings(home=tmp_path, database_url=url, heartbeat_seconds=600),
                   worker_id="w", queues=["q"])
    assert presence.reports == 1 and row(url) == ("idle", None)  # the start's own report

    presence.set("busy", "j1")  # a job shorter than the settle period
    time.sleep(0.3)
    assert presence.reports == 1  # busy is not reported at once
    presence.set("idle")
    assert wait_until(lambda: presence.reports == 2, timeout=5)
    time.sleep(1.2)  # past another settle period: nothing else to report
    assert presence.reports == 2 and row(url) == ("idle", None)

    presence.settle_seconds = 0.4

    presence.set("busy", "j2")  # a job that lasts: listed busy with it
    assert wait_until(lambda: row(url) == ("busy", "j2"), timeout=5)
    assert presence.reports == 3

    presence.settle_seconds = 600  # no settling for a stop
    presence.set("stopping", "j2")
    assert wait_until(lambda: row(url) == ("stopping", "j2"), timeout=5)
    assert presence.reports == 4
