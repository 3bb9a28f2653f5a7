"""A running job's lease, renewed by a background thread; it also notices cancel.

The thread writes the loop's progress with each renewal, so the hot loop never touches
the database. One such thread per worker process serves every lease it holds (_Keeper): a
job starts and ends without starting or joining a thread of its own."""

from __future__ import annotations

import logging
import os
import threading
import time

from sqlalchemy.orm import Session

from db import job_reads, leases, workers
from db.session import session_scope
from worker.control import Progress, Stopped

log = logging.getLogger(__name__)

# Set by the worker's warm shutdown (SIGTERM, Ctrl-C; worker/app.py): a training job stops
# between steps and is handed back to the queue instead of holding the shutdown up.
SHUTTING_DOWN = threading.Event()


class JobTimedOut(Exception):
    """The job ran past its `timeout`: it fails with this reason (checkpoints are kept)."""


class Lease:
    def __init__(self, *, db_url: str, job_id: str, worker_id: str, every_s: float,
                 progress: Progress) -> None:
        self.db_url, self.job_id, self.worker_id = db_url, job_id, worker_id
        self.every_s = every_s
        self.progress = progress
        self.lost = threading.Event()
        self.timed_out = threading.Event()
        # The job's timeout and the running time of its earlier attempts, read by the thread
        # on its first tick (None: not read yet, or the job has no timeout).
        self.timeout_s: float | None = None
        self.prior_s = 0.0
        self._limits_read = False
        # monotonic time just before the newest renewal that held (None: none yet)
        self.renewed_at: float | None = None
        self._t0 = time.monotonic()
        # Renew every `every_s`; in between, a read-only look each second, so a cancel stops
        # the loop within about a second even with a long heartbeat period.
        self.tick_s = min(self.every_s, 1.0)
        self._last_renewal = time.monotonic()

    def __enter__(self) -> Lease:
        _KEEPER.add(self)
        return self

    def __exit__(self, exc_type: object, exc: object, _tb: object) -> None:
        _KEEPER.remove(self)  # (after a tick in progress for it, if any)
        if isinstance(exc, Stopped) and self.timed_out.is_set() and not self.lost.is_set():
            raise JobTimedOut(f"timed out after {self.elapsed():.0f} s (timeout "
                              f"{self.timeout_s:g} s, counting every attempt's running "
                              "time); its checkpoints are kept") from None

    def elapsed(self) -> float:
        """This job's running time: earlier attempts' plus this one's so far."""
        return self.prior_s + time.monotonic() - self._t0

    def _read_limits(self, session: Session) -> None:
        self.timeout_s, self.prior_s = job_reads.timeout_and_prior_seconds(session,
                                                                           job_id=self.job_id)
        self._limits_read = True

    def _check_timeout(self) -> None:
        if self.timeout_s is not None and self.elapsed() > self.timeout_s:
            if not self.timed_out.is_set():
                log.warning("job %s timed out after %.1f s (timeout %g s)", self.job_id,
                            self.elapsed(), self.timeout_s)
            self.timed_out.set()

    def tick(self) -> bool:
        """One look (a renewal when due) on the keeper's thread; False once the lease is
        lost (nothing more to do for it)."""
        renew = time.monotonic() - self._last_renewal >= self.every_s - 1e-3
        sent = time.monotonic()
        try:
            with session_scope(self.db_url) as session:
                if not self._limits_read:
                    self._read_limits(session)
                if renew:
                    held = leases.heartbeat(session, job_id=self.job_id,
                                            worker_id=self.worker_id,
                                            progress=round(self.progress.value, 4))
                    if held:  # the worker's row says it is alive and on this job
                        workers.touch(session, worker_id=self.worker_id,
                                      current_job=self.job_id)
                else:
                    held = leases.holds_lease(session, job_id=self.job_id,
                                              worker_id=self.worker_id)
        except Exception:  # the database is down: keep training, try again next tick
            log.warning("heartbeat for job %s failed", self.job_id, exc_info=True)
            return True
        if renew:
            self._last_renewal = time.monotonic()
            if held:
                self.renewed_at = sent
        if not held:
            self.lost.set()
            return False
        # Past its timeout the job stops between steps, like a cancel; the thread goes on
        # renewing the lease so the worker can record the failure as the lease holder.
        self._check_timeout()
        return True

    def should_stop(self) -> bool:
        return self.lost.is_set() or self.timed_out.is_set()


class _Keeper:
    """The process's one lease thread, started with its first lease: it ticks each lease it
    holds `tick_s` after that lease's previous tick ended (as a thread of the lease's own
    would), one tick at a time, named `lease-<job id>` meanwhile."""

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Nothing held and no thread yet (also in a forked child: none of the parent's leases,
        and no lock a parent's thread held at the fork)."""
        self._cond = threading.Condition()
        self._due: dict[Lease, float] = {}  # lease -> when its next tick is due (monotonic)
        self._ticking: Lease | None = None
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._due[lease] = time.monotonic() + lease.tick_s
            if self._thread is None or not self._thread.is_alive():  # first, or it died
                thread = threading.Thread(target=self._run, name="leases", daemon=True)
                thread.start()
                self._thread = thread
            self._cond.notify_all()

    def remove(self, lease: Lease) -> None:
        """No tick for `lease` from now on: it is dropped, and a tick of it in progress is
        waited for."""
        with self._cond:
            self._due.pop(lease, None)
            while self._ticking is lease:
                self._cond.wait()

    def _next(self) -> Lease:
        with self._cond:
            while True:
                now = time.monotonic()
                due = min(self._due.items(), key=lambda item: item[1], default=None)
                if due is not None and due[1] <= now:
                    self._ticking = due[0]
                    return due[0]
                self._cond.wait(None if due is None else due[1] - now)

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            lease = self._next()
            me.name = f"lease-{lease.job_id}"
            going_on = True
            try:
                going_on = lease.tick()
            except Exception:  # noqa: BLE001 - a bug in one tick must not stop every lease
                log.exception("lease tick of job %s failed", lease.job_id)
            finally:
                me.name = "leases"
                with self._cond:
                    self._ticking = None
                    if lease in self._due:
                        if going_on:
                            self._due[lease] = time.monotonic() + lease.tick_s
                        else:
                            del self._due[lease]
                    self._cond.notify_all()


_KEEPER = _Keeper()
os.register_at_fork(after_in_child=_KEEPER.forget)
