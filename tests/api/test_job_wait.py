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


def test_a_wait_that_runs_out_answers_with_the_waiting_reason(alone: Stack) -> None:
    # reads during the wait only look at the state; the answer at its end is the whole job
    job_id = submit(alone)
    with alone.client() as client:
        r = client.get(f"/v1/jobs/{job_id}", params={"wait_seconds": 0.3})
        client.post(f"/v1/jobs/{job_id}/cancel")
    assert r.json()["state"] == "queued"
    assert "no live worker" in r.json()["waiting_reason"]  # the API runs alone


def test_the_state_notify_names_the_new_state(migrated_url: str) -> None:
    """Migration 0008: the NOTIFY a state change sends is "<job id> <new state>"."""
    import psycopg
    from sqlalchemy.engine import make_url

    from api.jobwait import CHANNEL
    from db import jobs
    from db.session import session_scope
    from tests.factories import train_request

    dsn = make_url(migrated_url).set(drivername="postgresql").render_as_string(
        hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        with session_scope(migrated_url) as session:
            job = jobs.create_job(session, tenant="t", kind="train", name="n",
                                  request=train_request(1), summary=None, max_attempts=1)
        with session_scope(migrated_url) as session:
            assert jobs.claim_job(session, job_id=job.id, worker_id="w") is not None
        with session_scope(migrated_url) as session:
            jobs.cancel_job(session, job_id=job.id, tenant=None)
        got = [n.payload for n in listener.notifies(timeout=2.0, stop_after=2)]
    assert got == [f"{job.id} running", f"{job.id} canceled"]


def test_a_wait_for_the_end_sleeps_through_the_start() -> None:
    """JobWaits.wake: a waiter for the job's end (the long poll) is not woken by a change to
    running; it is by an end, and by a bare id (a database before migration 0008); an event
    stream's waiter is woken by every change."""
    import asyncio

    from api.jobwait import JobWaits
    from convoy.settings import Settings

    async def run() -> list[tuple[bool, bool]]:
        waits = JobWaits(Settings(database_url="sqlite://"))
        seen = []
        with waits.subscribe("j", ended_only=True) as end, waits.subscribe("j") as any_change:
            for state in ("running", "succeeded", None):
                waits.wake("j", state)
                seen.append((end.event.is_set(), any_change.event.is_set()))
                end.event.clear()
                any_change.event.clear()
            waits.wake("other", "succeeded")
            seen.append((end.event.is_set(), any_change.event.is_set()))
        return seen

    assert asyncio.run(run()) == [(False, True), (True, True), (True, True), (False, False)]


# --- POST /v1/jobs with `Prefer: wait=N` (RFC 7240) -----------------------------------------

def test_a_submission_that_waits_answers_when_its_job_ends(alone: Stack) -> None:
    name = f"waits-{time.monotonic_ns()}"

    def submit_and_wait() -> tuple[int, dict[str, str], dict[str, object]]:
        with alone.client() as client:
            r = client.post("/v1/jobs", json={**job_request(1), "name": name},
                            headers={"Prefer": "wait=60"}, timeout=20)
            return r.status_code, dict(r.headers), dict(r.json())

    with ThreadPoolExecutor(1) as pool, alone.client() as client:
        waiting = pool.submit(submit_and_wait)
        deadline = time.monotonic() + 10
        mine: list[dict[str, object]] = []
        while not mine and time.monotonic() < deadline:  # the job exists while the POST waits
            mine = [j for j in client.get("/v1/jobs").json()["items"] if j["name"] == name]
            time.sleep(0.05)
        assert mine and mine[0]["state"] == "queued"
        assert not waiting.done()
        assert client.post(f"/v1/jobs/{mine[0]['id']}/cancel").status_code == 200
        status, headers, job = waiting.result()
    assert status == 201
    assert job["id"] == mine[0]["id"] and job["state"] == "canceled"
    assert headers["location"] == f"/v1/jobs/{job['id']}"
    assert headers["preference-applied"] == "wait=60"


def test_a_submission_whose_wait_runs_out_answers_the_job_as_it_is(alone: Stack) -> None:
    with alone.client() as client:
        r = client.post("/v1/jobs", json=job_request(1),
                        headers={"Prefer": "respond-async, wait=0.3"})
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "queued"
    assert "no live worker" in r.json()["waiting_reason"]  # the whole job, as a GET says it
    assert r.headers["preference-applied"] == "wait=0.3"


def test_a_retried_submission_that_waits_waits_on_the_first_ones_job(alone: Stack) -> None:
    key = f"k-{time.monotonic_ns()}"
    with alone.client() as client:
        first = client.post("/v1/jobs", json=job_request(1), headers={"Idempotency-Key": key})
        again = client.post("/v1/jobs", json=job_request(1),
                            headers={"Idempotency-Key": key, "Prefer": "wait=0.3"})
        client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"] and again.json()["state"] == "queued"


@pytest.mark.parametrize("value", ["wait=61", "wait=-1", "wait=soon", "wait=nan", "wait="])
def test_a_bad_wait_preference_is_422_naming_the_header_and_creates_nothing(
        alone: Stack, value: str) -> None:
    with alone.client() as client:
        before = len(client.get("/v1/jobs", params={"limit": 200}).json()["items"])
        r = client.post("/v1/jobs", json=job_request(1), headers={"Prefer": value})
        after = len(client.get("/v1/jobs", params={"limit": 200}).json()["items"])
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["header", "prefer"]]
    assert "wait" in r.json()["detail"][0]["msg"]
    assert after == before


def test_a_preference_other_than_wait_is_ignored(alone: Stack) -> None:
    with alone.client() as client:
        r = client.post("/v1/jobs", json=job_request(1), headers={"Prefer": "return=minimal"})
        client.post(f"/v1/jobs/{r.json()['id']}/cancel")
    assert r.status_code == 201 and "preference-applied" not in r.headers
    assert r.json()["state"] == "queued"


@pytest.mark.parametrize(("prefer", "seconds"), [
    ("wait=5", 5.0), ('wait="2.5"', 2.5), ("respond-async, WAIT = 1", 1.0),
    ("respond-async; wait=0", 0.0), ("return=minimal", 0.0), ("x-wait=9", 0.0), (None, 0.0)])
def test_the_wait_preference_is_read_as_rfc_7240_writes_it(prefer: str | None,
                                                           seconds: float) -> None:
    from api.routes.jobs import prefer_wait

    assert prefer_wait(prefer) == seconds


@pytest.mark.parametrize("prefer", ['wait="61"', 'wait="', "wait=inf", "wait=1e400"])
def test_a_wait_preference_out_of_range_raises_naming_the_header(prefer: str) -> None:
    from fastapi.exceptions import RequestValidationError

    from api.routes.jobs import prefer_wait

    with pytest.raises(RequestValidationError) as caught:
        prefer_wait(prefer)
    assert caught.value.errors()[0]["loc"] == ("header", "prefer")
