"""Two workers on a private Redis without persistence: duplicate delivery, 200 jobs at once,
and the broker killed (every message lost) and restarted while jobs are queued."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest

from convoy.queue import TRAIN_TASK, make_celery
from convoy.settings import Settings
from tests.reliability.infra import (
    PrivateRedis,
    attempts,
    make_stack,
    slow_job,
    stop_fast,
    sync_url,
    tiny_job,
    wait_for,
)
from tests.services import Stack, create_pg_database, drop_pg_database, wait_job


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, PrivateRedis]]:
    home = Path(tmp_path_factory.mktemp("broker"))
    redis_server = PrivateRedis(home)
    redis_server.start()
    url = create_pg_database()
    stack = make_stack(home, database_url=url, broker_url=redis_server.url,
                       reconcile_interval_seconds=0.5, requeue_after_seconds=2)
    try:
        stack.start_api()
        with ThreadPoolExecutor(2) as pool:  # both start at once
            list(pool.map(stack.start_worker, ["w0", "w1"]))
        yield stack, redis_server
    finally:
        stop_fast(stack)
        redis_server.kill()
        drop_pg_database(url)


def states(database_url: str, ids: list[str]) -> Counter[str]:
    with psycopg.connect(sync_url(database_url)) as conn:
        rows = conn.execute("SELECT state FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()
    return Counter(state for (state,) in rows)


def test_duplicate_delivery_of_one_message_runs_the_job_once(broker):
    stack, _ = broker
    celery = make_celery(Settings(database_url=stack.env["CONVOY_DATABASE_URL"],
                                  broker_url=stack.env["CONVOY_BROKER_URL"],
                                  queue=stack.env["CONVOY_QUEUE"], home=stack.home))
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_job(1)).json()["id"]
        for _ in range(2):  # the same task name and job id again: three deliveries in all
            celery.send_task(TRAIN_TASK, args=[job_id])
        done = wait_job(client, job_id)
        assert done["state"] == "succeeded" and done["attempt"] == 1
        assert client.get(f"/v1/jobs/{job_id}/metrics").json()["series"]["val_loss"] == [
            {"step": done["result"]["steps"], "epoch": 1,
             "value": done["result"]["val_loss"]}]

    def skipped() -> int:
        logs = stack.log_text("w0") + stack.log_text("w1")
        return sum(f"job {job_id} not claimable" in line for line in logs.splitlines())

    wait_for(lambda: skipped() == 2, timeout=60, what="two duplicate deliveries skipped")
    assert [(a, o) for a, _, _, _, o in attempts(stack.env["CONVOY_DATABASE_URL"], job_id)] \
        == [(1, "succeeded")]


def test_200_jobs_from_many_threads_on_two_workers_all_finish_once(broker):
    stack, _ = broker
    db = stack.env["CONVOY_DATABASE_URL"]

    def submit(i: int) -> str:
        with stack.client() as client:
            r = client.post("/v1/jobs", json=tiny_job(i))
            assert r.status_code == 201, r.text
            return r.json()["id"]

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(submit, range(200)))
    assert len(set(ids)) == 200

    wait_for(lambda: states(db, ids)["succeeded"] == 200, timeout=240, every=0.5,
             what=f"200 jobs to succeed: {states(db, ids)}")
    with psycopg.connect(sync_url(db)) as conn:
        rows = conn.execute("SELECT job_id, attempt, worker_id, started_at, ended_at, outcome "
                            "FROM job_attempts WHERE job_id = ANY(%s) "
                            "ORDER BY job_id, started_at", (ids,)).fetchall()
    by_job: dict[str, list[tuple]] = {}
    by_worker: dict[str, list[tuple]] = {}
    for job_id, attempt, worker, started, ended, outcome in rows:
        by_job.setdefault(job_id, []).append((attempt, worker, started, ended, outcome))
        by_worker.setdefault(worker, []).append((started, ended, job_id))
    assert set(by_job) == set(ids), "a job finished without a lease record"
    # Each job claimed once and run to the end: one lease-history row, attempt 1, succeeded.
    for job_id, history in by_job.items():
        assert len(history) == 1, f"{job_id} has {len(history)} attempts: {history}"
        [(attempt, _, started, ended, outcome)] = history
        assert (attempt, outcome) == (1, "succeeded"), (job_id, history)
        assert ended is not None and started <= ended, (job_id, history)
    # A solo worker runs one job at a time: its attempts' [started_at, ended_at] never overlap.
    assert set(by_worker) == {"w0", "w1"}, f"not both workers used: {set(by_worker)}"
    for worker, spans in by_worker.items():
        spans.sort()
        for (_, ended, a), (started, _, b) in zip(spans, spans[1:], strict=False):
            assert ended <= started, f"{worker} ran {a} and {b} at once"


def test_redis_killed_and_restarted_while_jobs_are_queued_loses_nothing(broker):
    stack, redis_server = broker
    with stack.client() as client:
        busy = [client.post("/v1/jobs", json=slow_job(2)).json()["id"] for _ in range(2)]
        wait_for(lambda: all(client.get(f"/v1/jobs/{i}").json()["state"] == "running"
                             for i in busy), timeout=60, what="both workers busy")
        waiting = [client.post("/v1/jobs", json=tiny_job(i)).json()["id"] for i in range(6)]
        assert {client.get(f"/v1/jobs/{i}").json()["state"] for i in waiting} == {"queued"}

        redis_server.kill()  # no persistence: the six messages are gone
        time.sleep(1)
        assert client.get("/readyz").status_code == 503
        redis_server.start()

        for job_id in busy + waiting:
            done = wait_job(client, job_id, timeout=120)
            assert done["state"] == "succeeded", (job_id, done["error"])
        assert client.get("/readyz").status_code == 200
