"""How the API is served.

uvicorn closes idle keep-alive connections but has no timeout for a request's headers: a
client that opens a connection and never finishes its headers held it (and a file
descriptor) forever; 21,000 of them exhausted the process's descriptors and every new
connection was refused. The protocol below adds, to uvicorn's own HTTP protocol:

- a header timeout: a connection must complete a request's headers within
  `header_timeout_seconds` of opening (or of its previous response), else it is closed;
- a connection cap: past `max_connections` open connections a new one is closed at once, so
  the descriptors in use stay bounded (uvicorn's `--limit-concurrency` only answers 503 once
  a request has been read, and does not bound them).

`serve_options()` gives the uvicorn options `convoy api` and `convoy run` use; start-up also
raises the soft RLIMIT_NOFILE to the hard limit. A reverse proxy belongs in front in
production all the same (docs/deploy.md).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from uvicorn.protocols.http.h11_impl import H11Protocol

from convoy.settings import Settings, get_settings

log = logging.getLogger("uvicorn.error")

# Descriptors kept free for everything else: database and broker connections, files, logs.
FD_HEADROOM = 256


@dataclass(frozen=True)
class Limits:
    header_timeout: float
    max_connections: int


_limits: Limits | None = None


def configure(settings: Settings) -> Limits:
    """The limits this process's protocols use (from `settings`, capped by the descriptors
    the process may open)."""
    global _limits
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = settings.max_connections
    if soft != resource.RLIM_INFINITY and cap > soft - FD_HEADROOM:
        cap = max(1, soft - FD_HEADROOM)
        log.warning("max_connections %d is above what RLIMIT_NOFILE %d allows: using %d",
                    settings.max_connections, soft, cap)
    _limits = Limits(settings.header_timeout_seconds, cap)
    return _limits


def limits() -> Limits:
    return _limits or configure(get_settings())


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft limit on open files to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class SlowClientGuard:
    """Mixed into uvicorn's HTTP protocols (they share connection_made, connection_lost,
    on_response_complete, `cycle`, `connections`, `transport` and `loop`)."""

    _refused_logged_at = 0.0
    if TYPE_CHECKING:  # provided by the uvicorn protocol this is mixed into
        connections: set[Any]
        loop: asyncio.AbstractEventLoop
        cycle: Any
        transport: asyncio.Transport

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits()
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # mixin: uvicorn's protocol follows in the MRO, which mypy cannot see from here
        super().connection_made(transport)  # type: ignore[misc]
        # a stream transport (uvloop's TCPTransport is one without subclassing asyncio's)
        transport = cast(asyncio.Transport, transport)
        if len(self.connections) > self._limits.max_connections:
            now = time.monotonic()
            if now - SlowClientGuard._refused_logged_at > 10:
                SlowClientGuard._refused_logged_at = now
                log.warning("%d connections open, the limit max_connections is %d: closing "
                            "new ones", len(self.connections),
                            self._limits.max_connections)
            transport.abort()
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]  # mixin, as above

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]  # mixin, as above
        # the next request's headers are due within the timeout too (an idle connection is
        # usually closed sooner, by the keep-alive timeout)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self._limits.header_timeout,
                                                  self._header_timeout, self.cycle)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self, cycle_then: object) -> None:
        self._header_timer = None
        # A new request cycle means some request's headers arrived since the timer was armed.
        if self.cycle is cycle_then and not self.transport.is_closing():
            self.transport.close()


class H11Guarded(SlowClientGuard, H11Protocol):
    pass


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - httptools is part of uvicorn[standard]
    GuardedProtocol: type[asyncio.Protocol] = H11Guarded
else:
    class HttpToolsGuarded(SlowClientGuard, HttpToolsProtocol):
        pass

    GuardedProtocol = HttpToolsGuarded


def serve_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options for the API against slow clients (see the module's doc)."""
    configure(settings)
    return {"http": "api.server:GuardedProtocol",
            "timeout_keep_alive": settings.keep_alive_seconds}
