"""Slow clients. Thousands of half-open requests (headers never finished) were held for 60 s,
and enough of them exhausted the API's file descriptors. `convoy api` now closes a connection whose
headers are not complete within the header timeout, closes idle keep-alive connections, closes
new connections past its connection cap at once, and raises its soft RLIMIT_NOFILE to the hard
limit. A normal request is answered while the slow ones are open."""

from __future__ import annotations

import selectors
import shlex
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.services import Stack, free_port, stack_env

HEADER_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1
MAX_CONNECTIONS = 400
SLOW = 300  # half-open connections, under the cap
EXTRA = 150  # more, past the cap
PARTIAL = b"GET /v1/jobs HTTP/1.1\r\nHost: localhost\r\nX-Slow: "  # never finished


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("slow-clients"))
    env = stack_env(home, database_url=f"sqlite:///{home / 'convoy.db'}",
                    broker_url=f"sqla+sqlite:///{home / 'broker.db'}",
                    queue=f"convoy-slow-{uuid.uuid4().hex[:8]}",
                    CONVOY_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT_S),
                    CONVOY_KEEP_ALIVE_SECONDS=str(KEEP_ALIVE_S),
                    CONVOY_MAX_CONNECTIONS=str(MAX_CONNECTIONS))
    s = Stack(env=env, home=home, port=free_port())
    # `convoy api` as compose runs it, started with a low soft limit on open files (1024, the
    # usual default) so that the test sees it raised to the hard limit
    api_cmd = [sys.executable, "-m", "cli.main", "api", "--migrate", "--host", "127.0.0.1",
               "--port", str(s.port)]
    try:
        s.start_api(cmd=["bash", "-c", f"ulimit -Sn 1024 && exec {shlex.join(api_cmd)}"])
        yield s
    finally:
        s.stop()


def half_open(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(PARTIAL)
        s.setblocking(False)
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket], until: float) -> dict[socket.socket, float]:
    """When the server closed each socket (EOF or reset), waiting until `until` at most."""
    closed: dict[socket.socket, float] = {}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    while len(closed) < len(socks) and time.monotonic() < until:
        for key, _ in sel.select(timeout=max(0.0, min(0.2, until - time.monotonic()))):
            s = key.fileobj
            try:
                data = s.recv(4096)  # type: ignore[union-attr]
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:  # anything else would be a response; the server sends none here
                closed[s] = time.monotonic()  # type: ignore[index]
                sel.unregister(s)
    sel.close()
    return closed


def test_half_open_connections_are_closed_after_the_header_timeout(api):
    t0 = time.monotonic()
    slow = half_open(api.port, SLOW)
    try:
        # a normal request is answered meanwhile, promptly
        started = time.monotonic()
        r = httpx.get(f"{api.url}/healthz", timeout=10)
        assert r.status_code == 200 and time.monotonic() - started < 2.0
        # none is closed early...
        assert not closed_by_server(slow, until=t0 + HEADER_TIMEOUT_S * 0.5)
        # ...and every one is closed within the timeout (plus a margin for a busy machine)
        closed = closed_by_server(slow, until=t0 + HEADER_TIMEOUT_S + 4)
        assert len(closed) == SLOW, f"{SLOW - len(closed)} half-open connections still open"
        assert max(closed.values()) - t0 < HEADER_TIMEOUT_S + 4
    finally:
        for s in slow:
            s.close()
    assert "Traceback" not in api.log_text("api")


def test_connections_past_the_cap_are_closed_at_once(api):
    slow = half_open(api.port, SLOW)
    try:
        t0 = time.monotonic()
        extra = half_open(api.port, EXTRA)
        try:
            # the ones past the cap are closed long before the header timeout
            early = closed_by_server(extra, until=t0 + HEADER_TIMEOUT_S * 0.5)
            assert len(early) >= SLOW + EXTRA - MAX_CONNECTIONS - 5, len(early)
            assert len(early) <= SLOW + EXTRA - MAX_CONNECTIONS + 5, len(early)
        finally:
            for s in extra:
                s.close()
    finally:
        for s in slow:
            s.close()
    # the slots come back: a normal request is answered again
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"{api.url}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the API did not recover after the burst"
        time.sleep(0.2)


def test_idle_keep_alive_connections_are_closed(api):
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = b""
        while b'"ok"}' not in response:  # the whole response: headers, then the JSON body
            chunk = s.recv(4096)
            assert chunk, response
            response += chunk
        assert response.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        s.settimeout(KEEP_ALIVE_S + 5)
        assert s.recv(4096) == b""  # closed by the server
        assert time.monotonic() - t0 < KEEP_ALIVE_S + 3


def test_the_api_raised_its_open_files_limit(api):
    import resource

    hard_here = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard_here <= 1024:
        pytest.skip("the hard limit here is no higher than the soft one the API starts with")
    limits = Path(f"/proc/{api.api.pid}/limits").read_text()
    [line] = [x for x in limits.splitlines() if x.startswith("Max open files")]
    soft, hard = line.split()[3:5]
    assert soft == hard, line
