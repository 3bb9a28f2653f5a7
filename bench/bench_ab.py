"""Two versions of the service side by side on PostgreSQL + Redis: a stack (API and worker
processes) started from another checkout of this repository (`--old`, e.g. a `git worktree`
of an earlier commit) and one from this one, jobs alternating between them (ABAB... then
BABA...), each job beside a bare loop in this process. On a machine whose speed drifts by
tens of percent within minutes, this is how a change of a few milliseconds per job shows.

    git worktree add /tmp/old <commit>
    python -m bench.bench_ab --old /tmp/old [--epochs 1] [--jobs 30]   [--smoke: this
                                                                      checkout twice, 2 jobs]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
from pathlib import Path

import torch

import tests.services as services
from bench.bench_e2e import BareLoop, job_request, run_one
from bench.common import machine
from bench.stacks import service


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--old", type=Path, help="the other checkout's root")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--jobs", type=int, default=30, help="jobs on each stack")
    p.add_argument("--one-request", action="store_true",
                   help="submit with `Prefer: wait` (a checkout without it long polls after)")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.old, args.jobs = args.old or services.ROOT, 2
    if args.old is None:
        p.error("--old is required")
    if not (args.old / "tests" / "services.py").is_file():
        raise SystemExit(f"--old {args.old}: not a checkout of this repository")
    torch.set_num_threads(1)  # as the worker runs
    print(machine(), f"{args.epochs}-epoch digits jobs, {args.jobs} on each stack")
    bare = BareLoop()
    body = job_request(args.epochs)
    with contextlib.ExitStack() as stacks:
        ours = services.ROOT
        services.ROOT = args.old.resolve()  # its processes run that checkout's code
        try:
            old = stacks.enter_context(service("pg"))
        finally:
            services.ROOT = ours
        new = stacks.enter_context(service("pg"))
        clients = {"old": stacks.enter_context(old.client()),
                   "new": stacks.enter_context(new.client())}
        for client in clients.values():  # each worker's first jobs pay one-time costs
            for _ in range(3):
                run_one(client, body)
        runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for i in range(args.jobs):
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                seconds = bare.seconds(args.epochs)
                runs[name].append((run_one(clients[name], body,
                                           one_request=args.one_request)["total"], seconds))
    for name, pairs in runs.items():
        ratio = statistics.median(t / b for t, b in pairs)
        overhead = statistics.median(t - b for t, b in pairs)
        print(f"{name}: e2e {statistics.median(t for t, _ in pairs) * 1e3:6.1f} ms  bare loop "
              f"{statistics.median(b for _, b in pairs) * 1e3:6.1f} ms  median ratio "
              f"{ratio:5.2f}x  median overhead {overhead * 1e3:5.1f} ms")


if __name__ == "__main__":
    main()
