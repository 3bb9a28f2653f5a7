"""A wake-up for the embedded broker (kombu's SQLAlchemy transport, which has no push): a
producer on the machine writes a byte to a FIFO beside the broker's SQLite file after each
message, and an idle worker waits on that FIFO instead of sleeping between polls. The poll
stays, at broker_polling_interval, for a wake-up that is lost."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import time
from pathlib import Path
from typing import Any

from kombu.transport.virtual import Empty

log = logging.getLogger(__name__)

SUFFIX = ".wake"


def fifo_path(url: str) -> Path | None:
    """The FIFO of an SQLite broker database (`sqlite:////path/broker.db`, with or without
    the `sqla+` prefix): `/path/broker.db.wake`; None for any other database (a server
    database may be shared by several machines: they keep the poll)."""
    from sqlalchemy.engine import make_url

    url = url.removeprefix("sqla+")
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL this transport could use either
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database + SUFFIX)


def wake(path: Path | None) -> bool:
    """One byte into the FIFO; True when a worker holds it open (it wakes, or will find the
    byte as soon as it is idle again). Never blocks, never raises: without a listener
    (ENXIO), a FIFO (ENOENT) or room (EAGAIN, wake-ups already pending) it does nothing."""
    if path is None or not hasattr(os, "mkfifo"):
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False  # something else took the name: never write into it
        os.write(fd, b"\0")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Listener:
    """The worker's end of the FIFO, opened read-write (so it never reads end-of-file when no
    producer holds it) and non-blocking. Where no FIFO can be made (no mkfifo, a path taken by
    another kind of file), wait() is a plain sleep: the poll as kombu does it."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.failed = path is None or not hasattr(os, "mkfifo")

    def _open(self) -> int | None:
        if self.fd is not None or self.failed:
            return self.fd
        assert self.path is not None
        try:
            with contextlib.suppress(FileExistsError):
                os.mkfifo(self.path, 0o600)
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a FIFO", str(self.path))
        except OSError as exc:
            self.failed = True
            log.warning("embedded broker: no wake-up FIFO at %s (%s); polling every "
                        "broker_polling_interval instead", self.path, exc)
            return None
        self.fd = fd
        return fd

    def wait(self, timeout: float) -> bool:
        """Until a wake-up arrives or `timeout` seconds pass; True on a wake-up. Every byte
        waiting is read: one poll answers them all."""
        fd = self._open()
        if fd is None:
            time.sleep(timeout)
            return False
        try:
            readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
        except InterruptedError:
            return False
        if not readable:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# one per FIFO in a process, whatever the number of connections (a reconnect makes a new
# transport; the FIFO stays open)
_listeners: dict[Path | None, Listener] = {}


def drain_events(transport: Any, connection: Any, timeout: float | None = None) -> None:
    """kombu's virtual Transport.drain_events, with the sleep between two empty polls
    replaced by a wait on the wake-up FIFO (at most polling_interval, as before)."""
    path = fifo_path(str(transport.client.hostname or ""))
    listener = _listeners.get(path)
    if listener is None:
        listener = _listeners[path] = Listener(path)
    start = time.monotonic()
    interval = transport.polling_interval
    while True:
        try:
            transport.cycle.get(transport._deliver, timeout=timeout)
            return
        except Empty:
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                raise TimeoutError() from None  # socket.timeout: what the worker's loop expects
            if interval is not None:
                listener.wait(interval if left is None else min(interval, left))

