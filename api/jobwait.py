"""Wake-ups for requests that wait on a job (GET /v1/jobs/{id}?wait_seconds=, the event
stream): on PostgreSQL, one LISTEN connection per API process hears the NOTIFY a job's state
change sends (migrations 0007 and 0008: "<job id> <new state>") and wakes that job's waiters
(a waiter for the job's end only when it ended); on SQLite, nothing can wake them, so they
re-read the row every `wait_poll_seconds`."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from sqlalchemy.engine import make_url

from convoy.settings import Settings
from db.states import TERMINAL_STATES

log = logging.getLogger(__name__)

CHANNEL = "convoy_job_state"  # db/migrations/versions/0007_job_state_notify.py
# With the listener up, a waiter re-reads its job this often all the same: a notification
# sent while the listener was reconnecting is lost (reconnecting also wakes every waiter).
LISTENING_RECHECK_SECONDS = 2.0


class Subscription:
    """One request's interest in one job: set when the job's state may have changed (with
    `ended_only`, when it may have ended)."""

    def __init__(self, ended_only: bool = False) -> None:
        self.event = asyncio.Event()
        self.ended_only = ended_only

    async def wait(self, timeout: float) -> bool:
        """True when woken within `timeout` seconds (and ready for the next wake-up)."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            return False
        self.event.clear()
        return True


class JobWaits:
    """The API process's waiters by job id, and what wakes them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._lock = threading.Lock()
        url = make_url(settings.database_url)
        self._pg_dsn = url.set(drivername="postgresql").render_as_string(hide_password=False) \
            if url.get_backend_name() == "postgresql" else None

    @property
    def recheck_seconds(self) -> float:
        """How long a waiter sleeps between two reads of its job when nothing wakes it."""
        if self._listening.is_set():
            return max(LISTENING_RECHECK_SECONDS, self.settings.wait_poll_seconds)
        return self.settings.wait_poll_seconds

    @contextmanager
    def subscribe(self, job_id: str, *, ended_only: bool = False) -> Iterator[Subscription]:
        """Subscribe before reading the job: a change committed after the read wakes it
        (with `ended_only`, a change to succeeded, failed or canceled)."""
        self._start_listener()
        sub = Subscription(ended_only)
        self._subs[job_id].add(sub)
        try:
            yield sub
        finally:
            subs = self._subs.get(job_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[job_id]

    def wake(self, job_id: str, state: str | None = None) -> None:
        """On the event loop: wake the job's waiters (when its new `state` is known and not
        an end, those that wait for its end stay asleep)."""
        ended = state is None or state in TERMINAL_STATES
        for sub in self._subs.get(job_id, ()):
            if ended or not sub.ended_only:
                sub.event.set()

    def wake_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.event.set()

    def _start_listener(self) -> None:
        """The LISTEN thread, started by the first waiter (PostgreSQL only)."""
        if self._pg_dsn is None or self._thread is not None or self._stop.is_set():
            return
        with self._lock:
            if self._thread is not None:
                return
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._listen, name="convoy-job-waits",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.wake_all()

    def _call(self, fn: Callable[..., None], *args: str | None) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(fn, *args)

    def _listen(self) -> None:
        import psycopg

        assert self._pg_dsn is not None
        backoff = 0.5
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._pg_dsn, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    backoff = 0.5
                    # anything sent before LISTEN took effect is re-read by its waiter now
                    self._call(self.wake_all)
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=1.0):
                            # "<id> <state>"; a bare id (a database still at migration
                            # 0007) wakes every waiter of the job
                            job_id, _, state = note.payload.partition(" ")
                            self._call(self.wake, job_id, state or None)
            except Exception:  # noqa: BLE001 - waiters fall back to re-reading meanwhile
                self._listening.clear()
                log.warning("job wake-up listener lost its connection; retrying in %.1f s",
                            backoff, exc_info=True)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
        self._listening.clear()
