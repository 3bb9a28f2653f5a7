"""Costs as the tables grow (issue 22): a PostgreSQL database filled to 1,000, 100,000 and
1,000,000 jobs (with 10 metric points, 2 artifacts and an attempt each) across 100 tenants,
and at each size the p50/p99 of a job read, a filtered list page deep into the list, a
metrics read, a submission (all through a real API process), a worker's claim and a
reconciler pass (called directly); each figure also as a ratio to the smallest size's.
Finally the plans (EXPLAIN ANALYZE) of the hot-path statements at the largest size.

Half the jobs belong to 5 big tenants (the ones with tokens: 10% of all jobs each), the rest
to 95 small ones. Every tenant also has 2 queued and 2 running jobs (the active set does not
grow with the history), so a reconciler pass finds the same work at every size.

    python -m bench.bench_scale [--sizes 1000,100000,1000000] [--quick] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select, text

from api.auth import hash_token
from bench.bench_e2e import job_request
from bench.common import machine, percentile
from bench.stacks import _drop_queue
from convoy.settings import Settings
from db import attempts, bulk, dispatch, job_reads, jobs, leases, metrics, tokens, usage
from db.base import utcnow
from db.migrate import upgrade
from db.plans import Statement, explain, outline, recorded
from db.session import get_engine, session_scope
from db.states import JobState
from db.tables import Job
from tests.services import REDIS, Stack, create_pg_database, drop_pg_database, stack_env

TENANTS = [f"tenant-{i:03d}" for i in range(100)]
BIG = TENANTS[:5]  # half of all jobs; the tenants the API is called as
SMALL = TENANTS[5:]
LEASE_S = 3600.0  # leases and resends the bench leaves alone while it measures
REQUEST = json.dumps(job_request(5))
SUMMARY = json.dumps({"params": 61706, "flops": 1.2e6})
RESULT = json.dumps({"epochs_done": 5, "val_accuracy": 0.97})
METRIC_NAMES = ("train_loss", "val_accuracy")
EPOCHS = 5  # x 2 names: 10 points a job
PAGE = 20


def secret_of(tenant: str) -> str:
    return f"cvy_bench-scale-{tenant}"


def bench_settings(url: str, queue: str) -> Settings:
    return Settings(database_url=url, broker_url=f"{REDIS}/0", queue=queue,
                    lease_seconds=LEASE_S, requeue_after_seconds=LEASE_S)


# -- filling -------------------------------------------------------------------------------

def tenant_of(i: int) -> str:
    """Job i's tenant: even jobs go round the 5 big tenants, odd ones round the 95 small."""
    return BIG[(i // 2) % len(BIG)] if i % 2 == 0 else SMALL[(i // 2) % len(SMALL)]


def add_tokens(url: str) -> None:
    with session_scope(url) as session:
        for tenant in BIG:
            tokens.create(session, tenant=tenant, token_hash=hash_token(secret_of(tenant)),
                          name="bench-scale")


def add_active(url: str, now: datetime, tenants: Sequence[str] = TENANTS
               ) -> dict[str, list[tuple[str, str]]]:
    """Each tenant's 2 queued and 2 running jobs (with their open attempt); returns
    {"queued": [(id, tenant)], "running": [(id, worker)]}."""
    job_rows, attempt_rows = [], []
    active: dict[str, list[tuple[str, str]]] = {"queued": [], "running": []}
    created = now - timedelta(minutes=1)
    started = now - timedelta(hours=2)  # older than a lease: close_orphaned reads them
    for tenant in tenants:
        for k in range(4):
            job_id = uuid.uuid4().hex
            running = k >= 2
            worker = f"w-{tenant}-{k}" if running else None
            job_rows.append((job_id, tenant, "train", "active",
                             JobState.RUNNING.value if running else JobState.QUEUED.value,
                             REQUEST, SUMMARY, None, None, 0.5 if running else 0.0, 1, 3,
                             worker, now if running else None, created, created,
                             started if running else None, None, now, None))
            if running:
                attempt_rows.append((job_id, 1, worker, started, None, None, "cpu", None))
                active["running"].append((job_id, worker or ""))
            else:
                active["queued"].append((job_id, tenant))
    with session_scope(url) as session:
        bulk.jobs(session, job_rows)
        bulk.attempts(session, attempt_rows)
    return active


def fill(url: str, *, start: int, stop: int, now: datetime, rng: random.Random,
         ids: dict[str, list[str]], chunk: int = 20000,
         progress: Callable[[str], None] = lambda _: None) -> None:
    """Jobs start..stop-1 (ended: 90% succeeded, 5% failed, 5% canceled, created over the
    past year) with an attempt, 10 metric points and 2 artifacts each, through db.bulk; the
    big tenants' job ids are added to `ids`."""
    for lo in range(start, stop, chunk):
        job_rows, attempt_rows, metric_rows, artifact_rows = [], [], [], []
        for i in range(lo, min(stop, lo + chunk)):
            job_id, tenant = uuid.uuid4().hex, tenant_of(i)
            r = rng.random()
            state = "succeeded" if r < 0.90 else "failed" if r < 0.95 else "canceled"
            created = now - timedelta(seconds=rng.uniform(3600, 365 * 86400))
            started, finished = created + timedelta(seconds=5), created + timedelta(seconds=65)
            job_rows.append((job_id, tenant, "train", f"job-{i}", state, REQUEST, SUMMARY,
                             RESULT if state == "succeeded" else None,
                             "boom" if state == "failed" else None,
                             1.0 if state == "succeeded" else 0.5, 1, 3, "w-old", finished,
                             created, created, started, finished, finished, None))
            attempt_rows.append((job_id, 1, "w-old", started, finished, state, "cpu", None))
            for epoch in range(1, EPOCHS + 1):
                metric_rows.append((job_id, METRIC_NAMES[0], epoch * 10, epoch,
                                    1.0 / epoch, started))
                metric_rows.append((job_id, METRIC_NAMES[1], epoch * 10, epoch,
                                    0.9 + epoch / 100, started))
            for kind, name in (("checkpoint", "epoch-5.safetensors"),
                               ("model", "model.safetensors")):
                artifact_rows.append((job_id, tenant, kind, name,
                                      f"jobs/{job_id}/{kind}/{name}", 250_000, "0" * 64,
                                      '{"epoch": 5}', finished))
            if tenant in ids:
                ids[tenant].append(job_id)
        with session_scope(url) as session:
            session.execute(text("SET LOCAL synchronous_commit = off"))
            bulk.jobs(session, job_rows)
            bulk.attempts(session, attempt_rows)
            bulk.metrics(session, metric_rows)
            bulk.artifacts(session, artifact_rows)
        progress(f"  filled {min(stop, lo + chunk)} jobs")
    vacuum_analyze(url)


def vacuum_analyze(url: str) -> None:
    """Statistics (and the visibility map index-only scans use) as autovacuum would leave
    them after a while; then a checkpoint, so the filling's dirty pages are not being written
    out while the next figures are measured."""
    with get_engine(url).connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in ("jobs", "job_attempts", "metrics", "artifacts"):
            conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        conn.exec_driver_sql("CHECKPOINT")


def deep_cursor(url: str, tenant: str, state: str, depth: float) -> tuple[datetime, str]:
    """The (created_at, id) of the tenant's job in `state` at `depth` (0..1) of its list:
    what a client that paged that far holds as its cursor. (OFFSET here, never in the API.)"""
    with session_scope(url) as session:
        n = session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant == tenant, Job.state == state)) or 0
        row = session.execute(
            select(Job.created_at, Job.id).where(Job.tenant == tenant, Job.state == state)
            .order_by(Job.created_at.desc(), Job.id.desc()).offset(int(n * depth)).limit(1)
        ).one()
    return row[0], row[1]


def refresh_active(url: str, active: dict[str, list[tuple[str, str]]]) -> None:
    """What live workers and the reconciler did lately: every lease renewed, every queued
    job sent."""
    with session_scope(url) as session:
        for job_id, worker in active["running"]:
            leases.heartbeat(session, job_id=job_id, worker_id=worker)
        dispatch.mark_sent(session, job_ids=[i for i, _ in active["queued"]])


# -- measuring -----------------------------------------------------------------------------

def timed(calls: Sequence[Callable[[], object]], *, warmup: int = 5) -> list[float]:
    """Each call's latency in ms, after a few untimed ones."""
    for call in calls[:warmup]:
        call()
    lat = []
    for call in calls:
        t0 = time.perf_counter()
        call()
        lat.append((time.perf_counter() - t0) * 1e3)
    return lat


def ok(r: httpx.Response, status: int = 200) -> httpx.Response:
    if r.status_code != status:
        raise RuntimeError(f"{r.request.method} {r.request.url}: {r.status_code} {r.text[:300]}")
    return r


def measure(url: str, stack: Stack, settings: Settings, ids: dict[str, list[str]],
            rng: random.Random, *, requests: int, submissions: int, passes: int
            ) -> dict[str, list[float]]:
    from api.reconciler import reconcile_once
    from api.routes.jobs import _encode_cursor
    from convoy.queue import make_celery

    clients = {t: stack.client(secret_of(t)) for t in BIG}
    out: dict[str, list[float]] = {}

    def get_job() -> Callable[[], object]:
        tenant = rng.choice(BIG)
        job_id = rng.choice(ids[tenant])
        return lambda: ok(clients[tenant].get(f"/v1/jobs/{job_id}"))

    out["GET /v1/jobs/{id}"] = timed([get_job() for _ in range(requests)])

    cursors = [(t, _encode_cursor(*deep_cursor(url, t, "succeeded", d)))
               for t in BIG for d in (0.2, 0.3, 0.4, 0.5)]

    def list_page() -> Callable[[], object]:
        tenant, cursor = rng.choice(cursors)

        def call() -> None:
            page = ok(clients[tenant].get("/v1/jobs", params={
                "state": "succeeded", "limit": PAGE, "cursor": cursor})).json()
            assert len(page["items"]) == PAGE, len(page["items"])
        return call

    out["GET /v1/jobs?state=&cursor= (deep)"] = timed([list_page() for _ in range(requests)])

    def get_metrics() -> Callable[[], object]:
        tenant = rng.choice(BIG)
        job_id = rng.choice(ids[tenant])

        def call() -> None:
            series = ok(clients[tenant].get(f"/v1/jobs/{job_id}/metrics")).json()["series"]
            assert len(series) == len(METRIC_NAMES), series
        return call

    out["GET /v1/jobs/{id}/metrics"] = timed([get_metrics() for _ in range(requests)])

    submitted: list[str] = []

    def submit(i: int) -> Callable[[], object]:
        client = clients[BIG[i % len(BIG)]]
        return lambda: submitted.append(ok(client.post("/v1/jobs", json=job_request(1)),
                                           201).json()["id"])

    out["POST /v1/jobs"] = timed([submit(i) for i in range(submissions)])

    claims = []
    for job_id in submitted:
        with session_scope(url) as session:
            t0 = time.perf_counter()
            job = jobs.claim_job(session, job_id=job_id, worker_id="bench-w",
                                 max_running=10**6)
            claims.append((time.perf_counter() - t0) * 1e3)
            assert job is not None, job_id
            jobs.finish_job(session, job_id=job_id, worker_id="bench-w",
                            state=JobState.SUCCEEDED)
    out["claim (db.jobs.claim_job)"] = claims

    def quota_sum(tenant: str) -> Callable[[], object]:
        def call() -> None:
            with session_scope(url) as session:
                usage.storage_of(session, tenant=tenant)
        return call

    # what a submission adds when max_storage_bytes_per_tenant is set (off by default, and so
    # in the API figures above): a sum over the tenant's artifact rows
    out["storage quota sum (db.usage.storage_of)"] = timed(
        [quota_sum(BIG[i % len(BIG)]) for i in range(submissions)])

    celery = make_celery(settings)
    acted = []
    out["reconciler pass"] = timed(
        [lambda: acted.append(reconcile_once(settings, celery)) for _ in range(passes)],
        warmup=2)
    if any(a["requeued"] or a["resent"] for a in acted):
        raise RuntimeError(f"the reconciler acted; the bench's active set should be at rest: "
                           f"{acted[:3]}")
    for client in clients.values():
        client.close()
    return out


# -- plans ---------------------------------------------------------------------------------

def hot_path_statements(url: str, settings: Settings, *, tenant: str, job_id: str
                        ) -> list[tuple[str, Statement]]:
    """(label, statement) for what each hot path runs: the db calls behind a job read, a
    filtered list page from a cursor, a metrics read, a submission with its quotas, a claim
    and a reconciler pass, run once each and recorded. Leaves one more job, ended."""
    engine = get_engine(url)
    found: list[tuple[str, Statement]] = []

    def run(label: str, call: Callable[[Any], object]) -> object:
        with recorded(engine) as seen, session_scope(url) as session:
            value = call(session)
        found.extend((label, s) for s in seen)
        return value

    digest = hash_token(secret_of(tenant))
    run("job read (token)", lambda s: job_reads.for_token(s, job_id=job_id, token_hash=digest))
    run("job read (tenant)", lambda s: job_reads.get_job(s, job_id=job_id, tenant=tenant))
    # halfway down the tenant's list, in its commonest state and in a rare one
    for label, state in (("list page", "succeeded"), ("list page (rare state)", "failed")):
        cursor = deep_cursor(url, tenant, state, 0.5)
        run(label, lambda s, state=state, cursor=cursor: job_reads.page(  # type: ignore[misc]
            s, tenant=tenant, state=state, before=cursor, limit=PAGE + 1))
    run("waiting reasons", lambda s: job_reads.running_counts(s, tenants=[tenant]))
    run("metrics", lambda s: metrics.series(s, job_id=job_id))
    run("storage quota", lambda s: usage.storage_of(s, tenant=tenant))
    created = run("submission", lambda s: jobs.create_job_once(
        s, tenant=tenant, max_queued=settings.max_queued_per_tenant, kind="train",
        name="plan", request=json.loads(REQUEST), summary=None, max_attempts=3))
    new_id = created[0].id  # type: ignore[index]
    run("claim", lambda s: jobs.claim_job(s, job_id=new_id, worker_id="plan-w",
                                          max_running=10**6))
    with session_scope(url) as session:
        jobs.finish_job(session, job_id=new_id, worker_id="plan-w", state=JobState.SUCCEEDED)
    run("reconciler", lambda s: (
        jobs.requeue_expired(s, lease_seconds=settings.lease_seconds),
        attempts.close_orphaned(s, lease_seconds=settings.lease_seconds),
        dispatch.stale_queued(s, older_than_seconds=settings.requeue_after_seconds),
        dispatch.count_queued(s)))
    return found


def print_plans(url: str, settings: Settings, ids: dict[str, list[str]]) -> None:
    tenant = BIG[0]
    statements = hot_path_statements(url, settings, tenant=tenant, job_id=ids[tenant][0])
    print("\nplans at the largest size (EXPLAIN ANALYZE; UPDATEs not run):")
    for label, statement in statements:
        is_select = statement.sql.lstrip().upper().startswith("SELECT")
        print(f"  {label:22} {outline(explain(get_engine(url), statement, analyze=is_select))}")


# -- the run -------------------------------------------------------------------------------

def table(sizes: Sequence[int], results: dict[int, dict[str, list[float]]]) -> None:
    base = sizes[0]
    head = "".join(f"{n:>12,}" for n in sizes)
    ratios = "".join(f"{f'{n:,}/{base:,}':>16}" for n in sizes[1:])
    print(f"{'figure (ms)':40}{'':4}{head}{ratios}")
    for name in results[base]:
        for q in (50, 99):
            values = [percentile(results[n][name], q) for n in sizes]
            cells = "".join(f"{v:12.2f}" for v in values)
            rs = "".join(f"{v / values[0]:15.2f}x" for v in values[1:])
            print(f"{name:40}p{q:<3}{cells}{rs}")


def verdict(sizes: Sequence[int], results: dict[int, dict[str, list[float]]]) -> None:
    base, top = results[sizes[0]], results[sizes[-1]]
    for name in base:
        goal = 2.0 if name == "reconciler pass" else 1.5 if name.startswith(("GET", "POST")) \
            else None
        ratio = percentile(top[name], 50) / percentile(base[name], 50)
        want = f"goal <= {goal}x: {'holds' if ratio <= goal else 'MISSED'}" if goal else "(no goal)"
        print(f"{sizes[-1]:,} / {sizes[0]:,} p50 {name}: {ratio:.2f}x  {want}")


@dataclass
class Site:
    """A database of its own with its API process, its tokens and its active jobs."""
    url: str
    stack: Stack
    settings: Settings
    active: dict[str, list[tuple[str, str]]]
    now: datetime
    ids: dict[str, list[str]] = field(default_factory=lambda: {t: [] for t in BIG})
    jobs: int = 0

    def grow(self, size: int, rng: random.Random) -> None:
        t0 = time.perf_counter()
        fill(self.url, start=self.jobs, stop=size, now=self.now, rng=rng, ids=self.ids,
             progress=partial(print, flush=True) if size - self.jobs > 50000
             else lambda _: None)
        self.jobs = size
        print(f"filled to {size:,} jobs in {time.perf_counter() - t0:.0f} s "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)

    def measure(self, rng: random.Random, args: argparse.Namespace) -> dict[str, list[float]]:
        refresh_active(self.url, self.active)
        return measure(self.url, self.stack, self.settings, self.ids, rng,
                       requests=args.requests, submissions=args.submissions,
                       passes=args.passes)


@contextmanager
def site() -> Iterator[Site]:
    url = create_pg_database()
    queue = f"convoy-bench-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="convoy-bench-scale-") as tmp:
        stack = Stack(env=stack_env(Path(tmp), database_url=url, broker_url=f"{REDIS}/0",
                                    queue=queue, CONVOY_LEASE_SECONDS=str(LEASE_S),
                                    CONVOY_REQUEUE_AFTER_SECONDS=str(LEASE_S)),
                      home=Path(tmp))
        try:
            upgrade(url)
            add_tokens(url)
            now = utcnow()
            active = add_active(url, now)
            stack.start_api()
            yield Site(url=url, stack=stack, settings=bench_settings(url, queue),
                       active=active, now=now)
        finally:
            stack.stop()
            _drop_queue(queue)
            get_engine(url).dispose()
            drop_pg_database(url)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--quick", action="store_true", help="sizes 1000,20000")
    p.add_argument("--smoke", action="store_true", help="sizes 500,2000, few requests")
    p.add_argument("--requests", type=int, default=200, help="of each GET, per measurement")
    p.add_argument("--submissions", type=int, default=100)
    p.add_argument("--passes", type=int, default=20, help="reconciler passes")
    p.add_argument("--rounds", type=int, default=4,
                   help="smallest/largest measurements alternated at the end")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.quick:
        sizes = [1000, 20000]
    if args.smoke:
        sizes, args.requests, args.submissions, args.passes, args.rounds = \
            [500, 2000], 30, 10, 5, 1
    print(machine(), f"uptime: {Path('/proc/loadavg').read_text().strip()}")
    rng = random.Random(22)
    grown_at: dict[int, dict[str, list[float]]] = {}
    with site() as grown, site() as baseline:
        # 1. one database grown size by size, measured at each
        for size in sizes:
            grown.grow(size, rng)
            grown_at[size] = grown.measure(rng, args)
            print(f"measured at {size:,}: " + ", ".join(
                f"{k} p50 {percentile(v, 50):.2f} ms" for k, v in grown_at[size].items()),
                flush=True)
        print("\nas the database grew (each size measured when it was reached):")
        table(sizes, grown_at)
        # 2. the largest against a second database kept at the smallest size, measured in
        # alternation: the machine's load drifts over the minutes the filling takes
        baseline.grow(sizes[0], rng)
        first, last = sizes[0], sizes[-1]
        side: dict[int, dict[str, list[float]]] = {first: {}, last: {}}
        for r in range(args.rounds):
            order = [(first, baseline), (last, grown)]
            for n, where in order if r % 2 == 0 else order[::-1]:  # ABBA...
                for name, values in where.measure(rng, args).items():
                    side[n].setdefault(name, []).extend(values)
        print(f"\nside by side ({args.rounds} alternated rounds, load "
              f"{os.getloadavg()[0]:.2f}):")
        table([first, last], side)
        print()
        verdict([first, last], side)
        print_plans(grown.url, grown.settings, grown.ids)


if __name__ == "__main__":
    main()
