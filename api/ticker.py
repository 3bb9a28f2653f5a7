"""A background loop of the API process: `tick()` every `interval()` seconds on a daemon
thread, from start() until stop(). The reconciler and the sweep driver are tickers."""

from __future__ import annotations

import threading


class Ticker:
    """Calls `tick()` every `interval()` seconds (read before each wait) on a daemon thread
    named `name`; stop() ends the loop and waits up to 10 s for a tick under way."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def interval(self) -> float:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval()):
            self.tick()
