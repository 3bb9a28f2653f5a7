"""End-to-end job time (submit -> succeeded through API, broker and worker) over the bare
loop's time for 1- and 10-epoch digits jobs, in embedded mode and on PostgreSQL + Redis;
then where a job's fixed cost goes, timed inside worker.runner.run_job.

    python -m bench.bench_e2e [--modes embedded,pg] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx
import torch

from bench.bench_trainer import DIGITS_CNN, bare_loop, fresh_model
from bench.common import machine, median
from bench.stacks import service
from convoy import datasets
from convoy.jobspec import TrainConfig
from worker.train import DeviceData

TERMINAL = ("succeeded", "failed", "canceled")


def job_request(epochs: int) -> dict[str, Any]:
    return {"kind": "train", "name": f"bench-{epochs}", "model": DIGITS_CNN,
            "dataset": {"name": "digits"}, "device": "cpu",
            "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "seed": 0}}


def run_one(client: httpx.Client, epochs: int) -> dict[str, float]:
    """Wall time from POST to the poll that sees the job finished (polls every 10 ms)."""
    t0 = time.perf_counter()
    r = client.post("/v1/jobs", json=job_request(epochs))
    r.raise_for_status()
    submitted = time.perf_counter() - t0
    job_id = r.json()["id"]
    while True:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in TERMINAL:
            break
        time.sleep(0.01)
    total = time.perf_counter() - t0
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['state']}: {job.get('error')}")
    at = {k: datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")}
    return {"total": total, "submit": submitted,
            "dispatch": (at["started_at"] - at["created_at"]).total_seconds(),
            "run": (at["finished_at"] - at["started_at"]).total_seconds()}


class BareLoop:
    """The bare loop on the same data and model in this process (one torch thread, as the
    worker runs), timed right beside each job so drift on a shared box hits both alike."""

    def __init__(self) -> None:
        self.data = DeviceData.from_numpy(datasets.load_digits(), torch.device("cpu"))
        self.seconds(1)  # warm-up

    def seconds(self, epochs: int) -> float:
        cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05)
        model = fresh_model(DIGITS_CNN, torch.device("cpu"))
        t0 = time.perf_counter()
        bare_loop(model, self.data, cfg)
        return time.perf_counter() - t0


def end_to_end(mode: str, epochs_list: list[int], repeats: int, bare: BareLoop) -> None:
    with service(mode) as stack, stack.client() as client:
        cold = run_one(client, 1)  # the worker's first job: imports, first allocations
        print(f"{mode}: first job after worker start (1 epoch): {cold['total']:.3f} s")
        for epochs in epochs_list:
            runs, bares = [], []
            for _ in range(repeats):  # ABAB
                bares.append(bare.seconds(epochs))
                runs.append(run_one(client, epochs))
            m = {k: median([r[k] for r in runs]) for k in runs[0]}
            b = median(bares)
            each = ", ".join(f"{r['total']:.2f}" for r in runs)
            print(f"{mode}: {epochs:2d}-epoch digits job  e2e {m['total']:.3f} s  bare loop "
                  f"{b:.3f} s  ratio {m['total'] / b:5.1f}x  fixed overhead "
                  f"{m['total'] - b:.3f} s  (POST {m['submit'] * 1e3:.0f} ms, created->started "
                  f"{m['dispatch'] * 1e3:.0f} ms, started->finished {m['run']:.3f} s; "
                  f"runs {each})")
        breakdown(mode, stack, epochs_list, repeats)


class Stopwatch:
    """Wraps functions on their modules for the duration of a measurement (no behaviour
    change: each wrapper calls the original and records how long it took)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - t0

        setattr(owner, attr, timed)
        self.undo.append(lambda: setattr(owner, attr, original))

    def restore(self) -> None:
        for fn in reversed(self.undo):
            fn()
        self.undo.clear()


def breakdown(mode: str, stack: Any, epochs_list: list[int], repeats: int) -> None:
    """Run jobs in this process through worker.runner.run_job on the stack's database
    and time its parts. The job row is created directly (no enqueue), so the stack's
    worker never sees it."""
    from convoy.artifacts import LocalStore
    from convoy.settings import Settings
    from db import jobs as jobs_db
    from db.session import session_scope
    from worker import checkpoints, runner, train_job

    settings = Settings(home=stack.home, database_url=stack.env["CONVOY_DATABASE_URL"],
                        broker_url=stack.env["CONVOY_BROKER_URL"])

    def one(epochs: int, watch: Stopwatch | None) -> float:
        from convoy.jobspec import TrainJobRequest, dump

        req = TrainJobRequest.model_validate(job_request(epochs))
        with session_scope(settings.database_url) as session:
            job = jobs_db.create_job(session, tenant="default", kind="train", name="bench",
                                     request=dump(req), summary={}, max_attempts=1)
        t0 = time.perf_counter()
        outcome = runner.run_job(job.id, settings=settings, worker_id="bench")
        if outcome != "done":
            raise RuntimeError(f"in-process job {job.id}: {outcome}")
        return time.perf_counter() - t0

    one(1, None)  # warm, as the service's worker is after its first job
    for epochs in epochs_list:
        watch = Stopwatch()
        for owner, attr, label in (
            (jobs_db, "claim_job", "db: claim"),
            (train_job.TrainRun, "checkpoint_rows", "db: resume lookup"),
            (train_job, "load_split", "dataset load"),
            (train_job.DeviceData, "from_numpy", "dataset to device"),
            (train_job, "build_model", "model build"),
            (train_job, "train", "train loop (incl. on_epoch)"),
            (checkpoints, "model_bytes", "  checkpoint serialise (model)"),
            (checkpoints, "optimizer_bytes", "  checkpoint serialise (optimizer)"),
            (train_job.TrainRun, "_wait_pending", "waiting for checkpoint writer"),
            (LocalStore, "put_bytes", "  [writer] checkpoint files"),
            (jobs_db, "record_epoch", "  [writer] db: epoch metrics+artifacts"),
            (jobs_db, "finish_job", "db: finish"),
        ):
            watch.wrap(owner, attr, label)
        try:
            totals = [one(epochs, watch) for _ in range(repeats)]
        finally:
            watch.restore()
        total = median(totals)
        print(f"{mode}: inside run_job, {epochs}-epoch job: {total * 1e3:.1f} ms "
              f"(mean of parts over {repeats} runs, ms):")
        named = 0.0
        for label, spent in watch.spent.items():
            per = spent / repeats * 1e3
            if not label.startswith("  "):
                named += per
            print(f"    {label:40s} {per:8.1f}")
        print(f"    {'other (session setup, lease, imports)':40s} "
              f"{max(0.0, total * 1e3 - named):8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="embedded,pg")
    p.add_argument("--epochs", default="1,10")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the worker runs (settings.torch_threads)
    epochs_list = [int(e) for e in args.epochs.split(",")]
    if args.smoke:
        epochs_list, args.repeats, args.modes = [1], 1, "embedded"
    print(machine())
    bare = BareLoop()
    for mode in args.modes.split(","):
        end_to_end(mode, epochs_list, args.repeats, bare)


if __name__ == "__main__":
    main()
