"""Helpers the benchmark scripts share: medians, percentiles, a busy core, the machine."""

from __future__ import annotations

import argparse
import inspect
import multiprocessing as mp
import os
import platform
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); enough for latency tables."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_core() -> Iterator[None]:
    """One process spinning on a core, as another job or test run would on a shared box."""
    proc = mp.get_context("spawn").Process(target=_spin, daemon=True)
    proc.start()
    try:
        yield
    finally:
        proc.terminate()
        proc.join()


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"nproc={os.cpu_count()} cpu={cpu!r} torch={torch.__version__} "
            f"threads={torch.get_num_threads()} gpu={gpu} loadavg={os.getloadavg()[0]:.2f}")


def pick_device(wanted: str = "auto") -> str:
    import torch

    if wanted == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return wanted


def model_bench_args(doc: str | None, *, rounds: int, smoke: str,
                     extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> argparse.Namespace:
    """The options of the model benchmarks (device, threads, rounds, --no-e2e, --smoke), read;
    torch set to the threads asked for, and the machine printed."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the worker's default)")
    p.add_argument("--rounds", type=int, default=rounds)
    for flag, options in extra:
        p.add_argument(flag, **options)
    p.add_argument("--no-e2e", action="store_true", help="skip the service jobs")
    p.add_argument("--smoke", action="store_true", help=smoke)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    args.device = torch.device(pick_device(args.device))
    print(machine(), f"device={args.device}")
    return args


class Stopwatch:
    """Wraps functions (sync or async) where they are looked up, for the duration of a
    measurement, recording each call's time (no behaviour change: each wrapper calls the
    original)."""

    def __init__(self) -> None:
        self.spent: dict[str, list[float]] = defaultdict(list)
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)
        spent = self.spent[label]
        if inspect.iscoroutinefunction(original):
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    spent.append(time.perf_counter() - t0)
            setattr(owner, attr, timed_async)
        else:
            def timed(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spent.append(time.perf_counter() - t0)
            setattr(owner, attr, timed)
        self.undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()
