"""The worker's own row in the workers table (GET /v1/workers, queued jobs' waiting
reasons): written when the worker is ready, every heartbeat period (idle or busy; a running
job's lease heartbeat refreshes it too, worker/lease.py), when it begins to stop, and
SETTLE_SECONDS after it turns busy or idle."""

from __future__ import annotations

import logging
import os
import socket
import threading
from datetime import datetime

from convoy.settings import Settings
from db import workers as workers_db
from db.base import utcnow
from db.session import session_scope

log = logging.getLogger(__name__)

# A change to busy or idle is reported this long after it, with whatever changed meanwhile:
# a run of short jobs costs one report per period, not one as each job starts (beside its
# claim) and one as it ends (beside its outcome), each a database write taking CPU from the
# job on a small machine. A job shorter than this may never be listed busy; "stopping" is
# reported at once.
SETTLE_SECONDS = 0.5


def devices() -> list[str]:
    """What this process can run on: `cpu`, and `cuda:N` for each visible GPU."""
    import torch

    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


class Presence:
    """One per worker process: a thread that reports the worker's state."""

    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.worker_id = ""
        self.queues: list[str] = []
        self.devices: list[str] = []
        self.state = "idle"
        self.job: str | None = None
        self.started_at: datetime | None = None
        self.settle_seconds = SETTLE_SECONDS
        self._wake = threading.Event()
        self._urgent = threading.Event()  # "stopping": reported without settling
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, settings: Settings, *, worker_id: str, queues: list[str]) -> None:
        self.settings, self.worker_id, self.queues = settings, worker_id, sorted(queues)
        self.devices = devices()
        self.started_at = utcnow()
        self.report()
        self._thread = threading.Thread(target=self._run, name="presence", daemon=True)
        self._thread.start()

    def set(self, state: str, job: str | None = None) -> None:
        """busy with `job`, idle, or stopping; reported by the thread, at once for stopping,
        else settle_seconds later."""
        with self._lock:
            self.state, self.job = state, job
        if state == "stopping":
            self._urgent.set()
        self._wake.set()

    def report(self) -> None:
        settings = self.settings
        if settings is None:  # not a started worker (a test calling the runner directly)
            return
        with self._lock:
            state, job, started = self.state, self.job, self.started_at
            self.started_at = None  # only the first report (re)sets started_at
        try:
            with session_scope(settings.database_url) as session:
                workers_db.report(session, worker_id=self.worker_id, host=socket.gethostname(),
                                  pid=os.getpid(), devices=self.devices, queues=self.queues,
                                  state=state, current_job=job, started_at=started)
        except Exception:  # the database is down: the next tick tries again
            log.warning("worker report failed", exc_info=True)
            with self._lock:
                self.started_at = self.started_at or started

    def _run(self) -> None:
        assert self.settings is not None
        while True:
            if self._wake.wait(self.settings.heartbeat_seconds):
                self._urgent.wait(self.settle_seconds)  # changes meanwhile join this report
            self._wake.clear()
            self.report()


PRESENCE = Presence()
