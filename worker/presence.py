"""The worker's own row in the workers table (GET /v1/workers, queued jobs' waiting
reasons): written when the worker is ready, every heartbeat period (idle or busy; a running
job's lease heartbeat refreshes it too, worker/lease.py), and when it begins to stop."""

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
        self._wake = threading.Event()
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
        """busy with `job`, idle, or stopping; reported at once (by the thread)."""
        with self._lock:
            self.state, self.job = state, job
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
            self._wake.wait(self.settings.heartbeat_seconds)
            self._wake.clear()
            self.report()


PRESENCE = Presence()
