"""GET /v1/jobs/{id}?wait_seconds=N, the long poll: it answers as soon as the job ends (woken
by PostgreSQL's NOTIFY, or by re-reading the row on SQLite), or after N seconds with the job
as it is; N is bounded. The API runs alone (no worker), so a submitted job stays queued until
the test cancels it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from bench.bench_e2e import job_request
from tests.services import Stack, api_alone, api_on_sqlite


@pytest.fixture(scope="module", params=["pg", "sqlite"])
def alone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp(f"wait-{request.param}"))
    if request.param == "pg":
        pg_url = request.getfixturevalue("pg_url")
        with api_alone(home, database_url=pg_url, queue_prefix="convoy-wait") as stack:
            yield stack
    else:
        with api_on_sqlite(home, queue_prefix="convoy-wait") as stack:
            yield stack


def submit(stack: Stack) -> str:
    with stack.client() as client:
        r = client.post("/v1/jobs", json=job_request(1))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def test_wait_returns_when_the_job_ends(alone: Stack) -> None:
    job_id = submit(alone)

    def wait() -> dict[str, object]:
        # the client gives up long before the wait would: only a wake-up answers in time
        with alone.client() as client:
            r = client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": 60}, timeout=20)
            assert r.status_code == 200, r.text
            return dict(r.json())

    with ThreadPoolExecutor(1) as pool, alone.client() as client:
        waiting = pool.submit(wait)
        time.sleep(0.5)  # let it reach its wait (a cancel before its first read is fine too)
        assert not waiting.done()
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        job = waiting.result()
    assert job["id"] == job_id
    assert job["state"] == "canceled"


def test_wait_answers_the_unfinished_job_after_the_timeout(alone: Stack) -> None:
    job_id = submit(alone)
    with alone.client() as client:
        r = client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": 0.3})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "queued"
        assert r.json()["id"] == job_id
        client.post(f"/v1/jobs/{job_id}/cancel")
        # an ended job is answered at once, whatever the wait asked for
        r = client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": 60}, timeout=20)
        assert r.json()["state"] == "canceled"


@pytest.mark.parametrize("value", ["-1", "60.5", "1e9", "nan", "soon"])
def test_wait_seconds_out_of_bounds_is_422_naming_it(alone: Stack, value: str) -> None:
    job_id = submit(alone)
    with alone.client() as client:
        r = client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": value})
        client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["query", "wait_seconds"]]


def test_wait_on_a_missing_job_or_with_a_bad_token_answers_at_once(alone: Stack) -> None:
    with alone.client() as client:
        r = client.get("/v1/jobs/nope", params={"wait_seconds": 60}, timeout=20)
        assert r.status_code == 404
    job_id = submit(alone)
    with alone.client(token="not-a-token") as client:
        r = client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": 60}, timeout=20)
        assert r.status_code == 401
