"""End-to-end job time (submit -> succeeded through API, broker and worker) over the bare
loop's time, side by side: 1- and 10-epoch digits jobs, the 10-epoch job again with a
checkpoint every epoch (what the default cadence saves), the 1-epoch job submitted with
`Prefer: wait` (the POST answers when it has ended: one request), and a compute-bound vgg-small job
on synthetic images; in embedded mode and on PostgreSQL + Redis. Then where a job's time
goes, timed inside worker.runner.run_job. Goals (issue 22, PostgreSQL): 10-epoch digits
within 1.25x, 1-epoch within 1.6x, vgg-small within 1.05x of the bare loop. The client
waits for each job with a long poll (GET /v1/jobs/{id}?wait_seconds=), as the SDK does;
`--short-polls` polls every 10 ms instead, as this bench did before the long poll existed.

    python -m bench.bench_e2e [--modes embedded,pg] [--repeats 3] [--vgg-epochs 2]
                              [--short-polls] [--smoke]
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import torch

from bench.bench_trainer import DIGITS_CNN, bare_loop, fresh_model
from bench.common import Stopwatch, machine, median
from bench.stacks import service
from convoy import datasets
from convoy.jobspec import TrainConfig
from worker.train import DeviceData

TERMINAL = ("succeeded", "failed", "canceled")


VGG_SMALL = {"preset": "vgg-small", "num_classes": 4}
EVERY_EPOCH = {"epochs": 1, "min_seconds": 0}


def job_request(epochs: int, *, model: str = "digits", samples: int = 512,
                every: dict[str, Any] | None = None) -> dict[str, Any]:
    """A digits CNN on digits, or vgg-small on `samples` synthetic 3x32x32 images; the
    service's default checkpoint cadence unless `every`."""
    spec, dataset = (DIGITS_CNN, {"name": "digits"}) if model == "digits" else (
        VGG_SMALL, {"name": "synthetic", "samples": samples})
    body: dict[str, Any] = {
        "kind": "train", "name": f"bench-{model}-{epochs}", "model": spec, "dataset": dataset,
        "device": "cpu", "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "seed": 0}}
    if every is not None:
        body["checkpoint_every"] = every
    return body


def run_one(client: httpx.Client, body: dict[str, Any], quiet_s: float = 0.0,
            long_poll: bool = True, one_request: bool = False) -> dict[str, float]:
    """Wall time from POST to the answer that says the job finished. A long poll
    (GET /v1/jobs/{id}?wait_seconds=, answered as soon as the job ends) by default: the job
    is seen at once and no polling takes CPU from it. Else (`--short-polls`, as before the
    long poll) polls every 10 ms after `quiet_s`: a job cannot end before its training has
    run, and 100 polls a second through the API take CPU from it on a 2-core machine; a job
    that ended earlier would only be seen late, which counts against it. `one_request`: the
    POST itself waits for the job (`Prefer: wait=20`, as the SDK's submit(wait_seconds=)),
    long polls after it only if it was not done by then."""
    t0 = time.perf_counter()
    r = client.post("/v1/jobs", json=body,
                    headers={"Prefer": "wait=20"} if one_request else None)
    r.raise_for_status()
    submitted = time.perf_counter() - t0
    job = r.json()
    job_id = job["id"]
    if not long_poll:
        time.sleep(max(0.0, quiet_s - (time.perf_counter() - t0)))
    while job["state"] not in TERMINAL:
        job = client.get(f"/v1/jobs/{job_id}",
                         params={"wait_seconds": 20} if long_poll else None).json()
        if not long_poll and job["state"] not in TERMINAL:
            time.sleep(0.01)
    total = time.perf_counter() - t0
    seen = datetime.now(UTC)
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job_id} {job['state']}: {job.get('error')}")
    at = {k: datetime.fromisoformat(job[k]) for k in ("created_at", "started_at", "finished_at")}
    return {"total": total, "submit": submitted,
            "dispatch": (at["started_at"] - at["created_at"]).total_seconds(),
            "run": (at["finished_at"] - at["started_at"]).total_seconds(),
            "late": (seen - at["finished_at"]).total_seconds()}


class BareLoop:
    """The bare loop on the same data and model in this process (one torch thread, as the
    worker runs), timed right beside each job so drift on a shared box hits both alike."""

    def __init__(self, model: str = "digits", samples: int = 512) -> None:
        if model == "digits":
            self.spec, split = DIGITS_CNN, datasets.load_digits()
        else:
            self.spec = VGG_SMALL
            split = datasets.load_synthetic(datasets.SyntheticRef(name="synthetic",
                                                                  samples=samples))
        self.data = DeviceData.from_numpy(split, torch.device("cpu"))
        self.seconds(1)  # warm-up

    def seconds(self, epochs: int) -> float:
        cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05)
        model = fresh_model(self.spec, torch.device("cpu"))
        t0 = time.perf_counter()
        bare_loop(model, self.data, cfg)
        return time.perf_counter() - t0


Row = tuple[str, int, dict[str, Any], BareLoop, bool]


def rows(epochs_list: list[int], bare: BareLoop, vgg: BareLoop | None, vgg_epochs: int,
         samples: int) -> list[Row]:
    """(label, epochs, request, bare loop, in one request) of each side-by-side row."""
    out: list[Row] = [(f"{e:2d}-epoch digits job", e, job_request(e), bare, False)
                      for e in epochs_list]
    least = min(epochs_list)
    out.append((f"{least:2d}-epoch digits, in one request", least, job_request(least),
                bare, True))
    most = max(epochs_list)
    if most > 1:
        out.append((f"{most:2d}-epoch digits, ckpt every epoch", most,
                    job_request(most, every=EVERY_EPOCH), bare, False))
    if vgg is not None:
        out.append((f"{vgg_epochs:2d}-epoch vgg-small ({samples} img)", vgg_epochs,
                    job_request(vgg_epochs, model="vgg-small", samples=samples), vgg, False))
    return out


def end_to_end(mode: str, table: list[Row], repeats: int, long_poll: bool = True) -> None:
    with service(mode) as stack, stack.client() as client:
        cold = run_one(client, job_request(1))  # the worker's first job: imports, allocations
        print(f"{mode}: first job after worker start (1 epoch): {cold['total']:.3f} s")
        for label, epochs, body, bare, one_request in table:
            runs, bares = [], []
            for _ in range(repeats):  # ABAB
                bares.append(bare.seconds(epochs))
                runs.append(run_one(client, body, quiet_s=0.8 * bares[-1],
                                    long_poll=long_poll, one_request=one_request))
            m = {k: median([r[k] for r in runs]) for k in runs[0]}
            b = median(bares)
            each = ", ".join(f"{r['total']:.2f}" for r in runs)
            print(f"{mode}: {label:34s} e2e {m['total']:.3f} s  bare loop "
                  f"{b:.3f} s  ratio {m['total'] / b:5.2f}x  fixed overhead "
                  f"{m['total'] - b:.3f} s  (POST {m['submit'] * 1e3:.0f} ms, created->started "
                  f"{m['dispatch'] * 1e3:.0f} ms, started->finished {m['run']:.3f} s, "
                  f"finished->seen {m['late'] * 1e3:.0f} ms; "
                  f"runs {each})")
        breakdown(mode, stack, table, repeats)


def breakdown(mode: str, stack: Any, table: list[Row], repeats: int) -> None:
    """Run jobs in this process through worker.runner.run_job on the stack's database
    and time its parts. The job row is created directly (no enqueue), so the stack's
    worker never sees it. Parts marked [writer] run on the checkpoint writer thread, beside
    the training loop; "waiting for writer" is what the loop and the outcome waited for it.
    The last epoch's checkpoint is written after the loop, with the outcome (lease check,
    serialise, files and one transaction, indented under it); the other indented parts run
    on the writer thread for the earlier epochs."""
    from convoy.artifacts import LocalStore
    from convoy.settings import Settings
    from db import jobs as jobs_db
    from db.session import session_scope
    from worker import checkpoints, runner, train_job

    settings = Settings(home=stack.home, database_url=stack.env["CONVOY_DATABASE_URL"],
                        broker_url=stack.env["CONVOY_BROKER_URL"])

    def one(body: dict[str, Any]) -> float:
        from convoy.jobspec import TrainJobRequest, dump

        req = TrainJobRequest.model_validate(body)
        with session_scope(settings.database_url) as session:
            job = jobs_db.create_job(session, tenant="default", kind="train", name="bench",
                                     request=dump(req), summary={}, max_attempts=1)
        t0 = time.perf_counter()
        outcome = runner.run_job(job.id, settings=settings, worker_id="bench")
        if outcome != "done":
            raise RuntimeError(f"in-process job {job.id}: {outcome}")
        return time.perf_counter() - t0

    one(job_request(1))  # warm, as the service's worker is after its first job
    for label, _epochs, body, _bare, one_request in table:
        if one_request:  # the same job as the row above it, inside the worker
            continue
        # once untimed: a model's first run pays one-time costs (kernels for its shapes, a
        # generated dataset), as the service's worker did in the rows above
        one(body)
        watch = Stopwatch()
        for owner, attr, name in (
            (jobs_db, "claim_job", "db: claim"),
            (train_job.TrainRun, "checkpoint_rows", "db: resume lookup"),
            (train_job, "load_split", "dataset load"),
            (train_job.DeviceData, "from_numpy", "dataset to device"),
            (train_job, "build_model", "model build"),
            (train_job, "train", "train loop (incl. on_epoch)"),
            (checkpoints, "snapshot", "  epoch snapshot (clone, training thread)"),
            (train_job.TrainRun, "_wait_pending", "waiting for writer"),
            (train_job.TrainRun, "_holds", "  db: lease check (ckpt epochs)"),
            (checkpoints, "snapshot_bytes", "  checkpoint serialise"),
            (LocalStore, "put_bytes", "  checkpoint files + sha256"),
            (jobs_db, "record_epoch", "  [writer] db: epoch record (1 txn)"),
            (train_job.TrainRun, "_prune", "  retention prune"),
            (train_job.TrainRun, "_succeed", "last epoch's checkpoint + outcome"),
            (jobs_db, "succeed_with_last_epoch", "  db: last epoch + success (1 txn)"),
            (jobs_db, "finish_job", "db: finish"),
        ):
            watch.wrap(owner, attr, name)
        try:
            totals = [one(body) for _ in range(repeats)]
        finally:
            watch.restore()
        total = median(totals)
        print(f"{mode}: inside run_job, {label.strip()}: {total * 1e3:.1f} ms "
              f"(mean of parts over {repeats} runs, ms):")
        named = 0.0
        for part, spent in watch.spent.items():
            per = sum(spent) / repeats * 1e3
            if not part.startswith("  "):
                named += per
            print(f"    {part:44s} {per:8.1f}")
        print(f"    {'other (session setup, lease, imports)':44s} "
              f"{max(0.0, total * 1e3 - named):8.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--modes", default="embedded,pg")
    p.add_argument("--epochs", default="1,10", help="digits jobs of these many epochs")
    p.add_argument("--vgg-epochs", type=int, default=2, help="0: no vgg-small row")
    p.add_argument("--vgg-samples", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--short-polls", action="store_true",
                   help="wait for each job by polling GET /v1/jobs/{id} every 10 ms (after 0.8x "
                        "the bare loop's time), as before the long poll")
    args = p.parse_args()
    torch.set_num_threads(1)  # as the worker runs (settings.torch_threads)
    epochs_list = [int(e) for e in args.epochs.split(",")]
    if args.smoke:
        epochs_list, args.repeats, args.modes, args.vgg_epochs = [1], 1, "embedded", 0
    print(machine(), "waiting by", "short polls" if args.short_polls else "long poll")
    bare = BareLoop()
    vgg = BareLoop("vgg-small", args.vgg_samples) if args.vgg_epochs else None
    table = rows(epochs_list, bare, vgg, args.vgg_epochs, args.vgg_samples)
    for mode in args.modes.split(","):
        end_to_end(mode, table, args.repeats, long_poll=not args.short_polls)


if __name__ == "__main__":
    main()
