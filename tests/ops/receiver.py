"""A webhook receiver on loopback for tests: each path answers the statuses its plan lists
(then 200; a negative entry -s answers 200 after s seconds), and every request is
recorded."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    plans: dict[str, list[int]] = field(default_factory=dict)
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        host = str(self.server.server_address[0])
        return f"http://{f'[{host}]' if ':' in host else host}:{self.server.server_address[1]}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.path == path]

    def wait(self, path: str, n: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.at(path)
            if len(found) >= n:
                return found
            time.sleep(0.05)
        raise TimeoutError(f"{path}: {len(self.at(path))} requests, waited for {n}")


def start_receiver(host: str = "127.0.0.1") -> Receiver:
    """On `host` (an IPv6 one such as "::1" too)."""
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
            body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
            with receiver.lock:
                receiver.got.append(Received(self.path, {k.lower(): v for k, v in
                                                         self.headers.items()}, body))
                plan = receiver.plans.get(self.path) or []
                status = plan.pop(0) if plan else 200
            if status < 0:  # a slow receiver: answers 200 after -status seconds
                time.sleep(-status)
                status = 200
            self.send_response(status)
            self.send_header("content-type", "text/plain")
            if 300 <= status < 400:
                self.send_header("location", "/elsewhere")
            self.end_headers()
            self.wfile.write(f"answered {status}".encode())

        def log_message(self, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = Server((host, 0), Handler)
    receiver = Receiver(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return receiver
