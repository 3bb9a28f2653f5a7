"""A worker's first job against its next ones, with the start-up warm-up on and off, side by
side in one run: a 1-epoch digits job submitted `--idle` seconds after the worker is ready,
then `--jobs` more; times are submission -> succeeded, read by the client.

    python -m bench.bench_first_job [--mode pg|embedded] [--idle 3] [--jobs 3] [--smoke]
"""

from __future__ import annotations

import argparse
import time

from bench.common import machine, median
from bench.stacks import service
from tests.factories import train_request
from tests.services import wait_job


def one(client) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    job = client.post("/v1/jobs", json=train_request(1)).json()
    done = wait_job(client, job["id"])
    assert done["state"] == "succeeded", done
    return time.perf_counter() - t0


def run(mode: str, warm_up: bool, idle: float, jobs: int) -> tuple[float, float, float]:
    """(worker start -> ready, first job, median of the next ones), in seconds."""
    with service(mode, workers=0, CONVOY_WORKER_WARM_UP=str(warm_up).lower()) as stack:
        t0 = time.perf_counter()
        stack.start_worker()  # returns when its log says ready
        ready = time.perf_counter() - t0
        time.sleep(idle)
        with stack.client() as client:
            first = one(client)
            rest = [one(client) for _ in range(jobs)]
    return ready, first, median(rest)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", choices=["pg", "embedded"], default="pg")
    p.add_argument("--idle", type=float, default=3.0)
    p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    jobs = 1 if args.smoke else args.jobs
    print(machine())
    print(f"first job vs next ones, mode={args.mode}, submitted {args.idle:g} s after the "
          f"worker is ready, 1-epoch digits, submit -> succeeded")
    for warm_up in (False, True):
        ready, first, rest = run(args.mode, warm_up, args.idle, jobs)
        print(f"  warm-up {'on ' if warm_up else 'off'}  first job {first:6.2f} s  next jobs "
              f"{rest:6.2f} s  first - next {first - rest:+.2f} s  (worker start -> ready "
              f"{ready:.2f} s)")


if __name__ == "__main__":
    main()
