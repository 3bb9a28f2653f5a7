"""Retry a short database write through an outage: a worker that trained for an hour must
not throw the epoch (or the whole job) away because PostgreSQL restarted for ten seconds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, OperationalError | InterfaceError) or (
        isinstance(exc, DBAPIError) and exc.connection_invalidated)


def retry_db(fn: Callable[[], T], *, what: str, within_s: float) -> T:
    """fn() (which opens its own session), retried with backoff while the database is
    unreachable, for up to `within_s` seconds; other errors go straight through."""
    deadline = time.monotonic() + within_s
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_disconnect(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unreachable (%s); retrying in %.1fs", what,
                        type(exc).__name__, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)
