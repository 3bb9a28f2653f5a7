"""The API is SIGKILLed during 50 concurrent submissions. Every client is the SDK
(client.sdk.Convoy), which sends one Idempotency-Key per submission and retries with it after a
connection error or a 5xx. After the API is restarted, each key maps to exactly one job and
there are as many jobs as keys: no lost answer turned into a duplicate."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from client.sdk import Convoy
from tests.reliability.infra import api_without_workers, sync_url, tiny_job
from tests.security.conftest import make_token
from tests.services import Stack

CLIENTS = 50


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Stack]:
    with api_without_workers(tmp_path, requeue_after_seconds=3600) as stack:
        yield stack


def count_jobs(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM jobs").fetchone()[0]


def test_sigkilled_api_during_50_submissions_then_sdk_retries_make_no_duplicates(api: Stack):
    db = sync_url(api.env["CONVOY_DATABASE_URL"])
    with api.client() as admin:
        token = make_token(admin, "retrier")["token"]
    results: dict[int, str] = {}
    errors: dict[int, BaseException] = {}
    start = threading.Barrier(CLIENTS + 1)

    def submit(i: int) -> None:
        # backoff 0.2 s doubling to 10 s: about 40 s of retries, time for the API's restart
        with Convoy(api.url, token, timeout=30, retries=8, retry_backoff=0.2) as sdk:
            start.wait()
            try:
                results[i] = sdk.submit(tiny_job(i)).id
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors[i] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    start.wait()
    # SIGKILL once some jobs are committed and others are still on their way
    deadline = time.monotonic() + 30
    while (made := count_jobs(db)) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert api.api is not None
    Stack.kill(api.api, signal.SIGKILL)
    killed_at = count_jobs(db)
    assert 3 <= made <= killed_at < CLIENTS, "the kill did not land during the submissions"
    api.start_api()  # same port, same database
    for t in threads:
        t.join(timeout=90)
    assert not errors, {i: repr(e) for i, e in errors.items()}
    assert len(results) == CLIENTS
    with psycopg.connect(db) as conn:
        jobs = {r[0] for r in conn.execute("SELECT id FROM jobs")}
        keys = conn.execute("SELECT key, resource_id FROM idempotency_keys "
                            "WHERE tenant = 'retrier'").fetchall()
    assert len(jobs) == CLIENTS, f"{len(jobs)} jobs for {CLIENTS} submissions"
    assert len(keys) == CLIENTS and {job for _, job in keys} == jobs  # one job per key
    assert set(results.values()) == jobs  # and every client got its own job
