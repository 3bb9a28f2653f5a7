"""Where a POST /v1/jobs spends its time, part by part, in process: the API app (its
lifespan included) on a fresh PostgreSQL database and Redis, driven through Starlette's
TestClient with bench_e2e's 1-epoch digits request, each part timed by a wrapper around the
function that does it (no behaviour change). Then the same for GET /v1/jobs/{id}.

    python -m bench.bench_submit [--requests 200] [--smoke]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from tempfile import TemporaryDirectory

from bench.bench_e2e import job_request
from bench.common import Stopwatch, machine, median
from tests.services import REDIS, TOKEN, create_pg_database, drop_pg_database


def report(title: str, totals: list[float], watch: Stopwatch) -> None:
    print(f"{title}: median {median(totals) * 1e3:.2f} ms over {len(totals)} requests "
          "(TestClient's own cost included); parts, median ms per request:")
    for label, spent in watch.spent.items():
        if spent:
            print(f"    {label:48s} {median(spent) * 1e3:7.3f}  (x{len(spent) / len(totals):.0f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    n = 5 if args.smoke else args.requests
    print(machine())
    from fastapi import routing
    from fastapi.testclient import TestClient
    from pydantic import TypeAdapter

    import api.deps
    import api.routes.jobs as jobs_route
    import api.submit
    import db.jobs
    from api.app import create_app
    from convoy.jobspec import JobRequest
    from convoy.settings import Settings
    from db.migrate import upgrade

    url = create_pg_database()
    try:
        with TemporaryDirectory(prefix="convoy-bench-submit-") as tmp:
            upgrade(url)
            settings = Settings(home=Path(tmp), database_url=url, broker_url=f"{REDIS}/0",
                                queue=f"convoy-bench-{uuid.uuid4().hex[:8]}",
                                bootstrap_token=TOKEN)
            body = job_request(1)
            raw = json.dumps(body).encode()
            adapter = TypeAdapter(JobRequest)
            t0 = time.perf_counter()
            for _ in range(n):
                adapter.validate_python(json.loads(raw))
            validate = (time.perf_counter() - t0) / n
            print(f"body parse + JobRequest validation alone: {validate * 1e3:.3f} ms")
            app = create_app(settings)
            with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
                for _ in range(5):  # warm: first requests pay imports and connections
                    client.post("/v1/jobs", content=raw,
                                headers={"Content-Type": "application/json"})
                watch = Stopwatch()
                for owner, attr, label in (
                    (api.deps, "lookup_token", "auth: token lookup (own session)"),
                    (jobs_route, "dump", "request dump to JSON"),
                    (jobs_route, "idem_for", "idempotency key"),
                    (jobs_route, "check_train", "check_train (all)"),
                    (api.submit, "summarize_or_422", "  model summary (shape inference)"),
                    (api.submit, "dataset_info", "  dataset info"),
                    (jobs_route, "check_init", "check_init"),
                    (jobs_route, "check_timeout", "check_timeout"),
                    (jobs_route, "check_storage", "quota: storage"),
                    (db.jobs, "create_job_once", "db: lock + count + INSERT + commit"),
                    (jobs_route, "enqueue", "celery publish to broker"),
                    (jobs_route, "job_out", "response model (JobOut)"),
                    (jobs_route, "_submit", "handler body (_submit)"),
                    (routing, "serialize_response", "FastAPI response serialisation"),
                ):
                    watch.wrap(owner, attr, label)
                totals = []
                try:
                    for _ in range(n):
                        t0 = time.perf_counter()
                        r = client.post("/v1/jobs", content=raw,
                                        headers={"Content-Type": "application/json"})
                        totals.append(time.perf_counter() - t0)
                        assert r.status_code == 201, r.text
                finally:
                    watch.restore()
                report("POST /v1/jobs (1-epoch digits)", totals, watch)
                job_id = r.json()["id"]
                watch = Stopwatch()
                for owner, attr, label in (
                    (jobs_route, "job_for_token", "db: token + job read (1 statement)"),
                    (jobs_route, "with_reasons", "waiting reasons (queued job only)"),
                    (jobs_route, "job_out", "response model (JobOut)"),
                ):
                    watch.wrap(owner, attr, label)
                totals = []
                try:
                    for _ in range(n):
                        t0 = time.perf_counter()
                        r = client.get(f"/v1/jobs/{job_id}")
                        totals.append(time.perf_counter() - t0)
                        assert r.status_code == 200, r.text
                finally:
                    watch.restore()
                report("GET /v1/jobs/{id} (a queued job)", totals, watch)
                t0 = time.perf_counter()
                for _ in range(n):
                    client.get("/healthz")
                floor = (time.perf_counter() - t0) / n
                print(f"GET /healthz (TestClient floor): {floor * 1e3:.2f} ms")
    finally:
        import redis

        r2 = redis.Redis.from_url(f"{REDIS}/0")
        r2.delete(*(r2.keys(f"{settings.queue}*") or [settings.queue]))
        r2.close()
        asyncio.set_event_loop(None)
        drop_pg_database(url)


if __name__ == "__main__":
    main()
