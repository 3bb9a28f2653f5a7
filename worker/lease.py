"""A running job's lease, renewed by a background thread; it also notices cancel.

The thread writes the loop's progress with each renewal, so the hot loop never touches
the database."""

from __future__ import annotations

import logging
import threading
import time

from db import jobs
from db.session import session_scope
from worker.train import Progress

log = logging.getLogger(__name__)

# Set by the worker's warm shutdown (SIGTERM, Ctrl-C; worker/app.py): a training job stops
# between steps and is handed back to the queue instead of holding the shutdown up.
SHUTTING_DOWN = threading.Event()


class Lease:
    def __init__(self, *, db_url: str, job_id: str, worker_id: str, every_s: float,
                 progress: Progress) -> None:
        self.db_url, self.job_id, self.worker_id = db_url, job_id, worker_id
        self.every_s = every_s
        self.progress = progress
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        # Renew every `every_s`; in between, a read-only look each second, so a cancel stops
        # the loop within about a second even with a long heartbeat period.
        tick = min(self.every_s, 1.0)
        last_renewal = time.monotonic()
        while not self._stop.wait(tick):
            renew = time.monotonic() - last_renewal >= self.every_s - 1e-3
            try:
                with session_scope(self.db_url) as session:
                    if renew:
                        held = jobs.heartbeat(session, job_id=self.job_id,
                                              worker_id=self.worker_id,
                                              progress=round(self.progress.value, 4))
                    else:
                        held = jobs.holds_lease(session, job_id=self.job_id,
                                                worker_id=self.worker_id)
            except Exception:  # the database is down: keep training, try again next tick
                log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)
                continue
            if renew:
                last_renewal = time.monotonic()
            if not held:
                self.lost.set()
                return

    def should_stop(self) -> bool:
        return self.lost.is_set()
