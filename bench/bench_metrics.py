"""What /metrics costs: one scrape (every family, read from the database) beside one job
read, at growing numbers of jobs, on SQLite and PostgreSQL; and what timing every request
(the HttpMetrics middleware) adds to an ASGI call, measured side by side (ABAB, medians).
In-process, no servers.

    python -m bench.bench_metrics [--jobs 1000 10000] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from api.metrics import HttpMetrics, render
from bench.common import machine, median
from convoy.settings import Settings
from db import job_reads, jobs
from db.base import utcnow
from db.migrate import upgrade
from db.session import get_engine, session_scope
from db.states import JobState
from tests.services import create_pg_database, drop_pg_database


def fill(url: str, n: int) -> str:
    """n jobs (most ended, some queued and running), as many per kind; returns one id."""
    t0 = utcnow() - timedelta(days=1)
    states = [JobState.SUCCEEDED] * 6 + [JobState.FAILED, JobState.CANCELED, JobState.QUEUED,
                                         JobState.RUNNING]
    with session_scope(url) as session:
        for i in range(n):
            job = jobs.create_job(session, tenant=f"t{i % 7}", kind="train" if i % 3 else
                                  "feature_maps", name="", request={"device": "cpu"},
                                  summary=None, max_attempts=1)
            job.state = states[i % len(states)]
            job.created_at = t0 + timedelta(seconds=i)
            if job.state != JobState.QUEUED:
                job.started_at = job.created_at + timedelta(seconds=i % 97)
            if job.state.terminal:
                job.finished_at = (job.started_at or job.created_at) + timedelta(seconds=i % 3601)
            if i % 1000 == 999:
                session.flush()
        session.commit()
        return job.id


def timed(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return median(times)


def scrape_vs_read(url: str, sizes: list[int], label: str) -> None:
    upgrade(url)
    settings = Settings(database_url=url)
    have = 0
    for n in sizes:
        job_id = fill(url, n - have)
        have = n

        def scrape() -> None:
            with session_scope(url) as session:
                render(session, settings)

        def read(job_id: str = job_id) -> None:
            with session_scope(url) as session:
                job_reads.get_job(session, job_id=job_id)

        scrape()  # warm
        s, r = timed(scrape, 7), timed(read, 50)
        print(f"{label:<10} {n:>7} jobs  scrape {1000 * s:8.1f} ms  one job read "
              f"{1000 * r:6.2f} ms  ratio scrape/read = {s / r:.0f}", flush=True)


async def middleware_cost(calls: int) -> tuple[float, float]:
    """Seconds per call of a trivial ASGI app, bare and wrapped in HttpMetrics."""
    api = FastAPI()

    @api.get("/v1/jobs/{job_id}")
    async def one(job_id: str) -> dict[str, str]:
        return {"id": job_id}

    wrapped = HttpMetrics(api, api=api)
    scope = {"type": "http", "method": "GET", "path": "/v1/jobs/abc", "raw_path": b"/v1/jobs/abc",
             "query_string": b"", "headers": [], "http_version": "1.1", "scheme": "http",
             "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1), "root_path": ""}

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_: object) -> None:
        return None

    async def run(app: object) -> float:
        t = time.perf_counter()
        for _ in range(calls):
            await app(dict(scope), receive, send)  # type: ignore[operator]
        return (time.perf_counter() - t) / calls

    bare, timed_ = [], []
    for _ in range(3):  # ABAB
        bare.append(await run(api))
        timed_.append(await run(wrapped))
    return median(bare), median(timed_)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    sizes = [100, 300] if args.smoke else sorted(args.jobs)
    print(machine())
    with tempfile.TemporaryDirectory() as home:
        scrape_vs_read(f"sqlite:///{Path(home) / 'convoy.db'}", sizes, "sqlite")
    pg = create_pg_database()
    try:
        scrape_vs_read(pg, sizes, "postgresql")
    finally:
        get_engine(pg).dispose()
        drop_pg_database(pg)
    bare, wrapped = asyncio.run(middleware_cost(500 if args.smoke else 5000))
    print(f"request timing: bare {1e6 * bare:.1f} us/call, with HttpMetrics {1e6 * wrapped:.1f} "
          f"us/call, +{1e6 * (wrapped - bare):.1f} us, ratio timed/bare = {wrapped / bare:.2f}")


if __name__ == "__main__":
    main()
