"""Dispatch latency: submission (the job row's created_at) to `running` (started_at, set by
the worker's claim) with an idle worker, p50 and p99, on Redis and on the embedded broker;
then the idle worker's CPU time over `--idle` seconds (what its wait on the broker costs).

    python -m bench.bench_dispatch [--modes pg,embedded] [--jobs 40] [--idle 20] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import datetime

from bench.bench_e2e import job_request
from bench.common import machine, median, percentile
from bench.stacks import service
from tests.services import wait_job


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(mode: str, jobs: int, idle: float) -> tuple[list[float], float]:
    latencies = []
    with service(mode) as stack, stack.client() as client:
        for i in range(jobs + 1):
            r = client.post("/v1/jobs", json=job_request(1))
            r.raise_for_status()
            job = wait_job(client, r.json()["id"], timeout=120)
            if job["state"] != "succeeded":
                raise RuntimeError(f"job {job['id']} {job['state']}: {job['error']}")
            if i == 0:
                continue  # the worker's first job pays its imports; not a dispatch cost
            started = datetime.fromisoformat(job["started_at"])
            created = datetime.fromisoformat(job["created_at"])
            latencies.append((started - created).total_seconds() * 1e3)
            time.sleep(0.05)  # the worker is back waiting on the broker: idle
        pid = stack.workers[0].pid
        time.sleep(1.0)
        before = cpu_seconds(pid)
        time.sleep(idle)
        idle_cpu = cpu_seconds(pid) - before
    return latencies, idle_cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="pg,embedded")
    p.add_argument("--jobs", type=int, default=40)
    p.add_argument("--idle", type=float, default=20.0)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.jobs, args.modes, args.idle = 2, "pg", 1.0
    print(machine())
    for mode in args.modes.split(","):
        ms, idle_cpu = measure(mode, args.jobs, args.idle)
        broker = "Redis" if mode == "pg" else "SQLAlchemy/SQLite broker"
        print(f"dispatch {mode} ({broker}), {len(ms)} jobs, created_at -> started_at: "
              f"p50 {median(ms):.1f} ms  p99 {percentile(ms, 99):.1f} ms  "
              f"min {min(ms):.1f}  max {max(ms):.1f}  (goal p50 < 100 ms); idle worker CPU "
              f"{idle_cpu / args.idle * 100:.2f}% of a core over {args.idle:g} s")


if __name__ == "__main__":
    main()
