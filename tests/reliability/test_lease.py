"""The lease thread with the default-length heartbeat (every_s=5, not the 1 s the test stacks
use): a cancel is still noticed within about a second, because between renewals it takes a
read-only look each second; the renewal itself (heartbeat_at and progress written) comes only
every 5 s. worker.lease.Lease is used directly, on a real PostgreSQL database."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import psycopg
from sqlalchemy import event

from db import jobs
from db.base import utcnow
from db.session import get_engine, session_scope
from tests.factories import train_request
from tests.reliability.infra import sync_url
from worker.control import Progress
from worker.lease import Lease

EVERY_S = 5.0  # the default CONVOY_HEARTBEAT_SECONDS


def claimed_job(migrated_url: str, worker_id: str = "w") -> str:
    with session_scope(migrated_url) as session:
        job = jobs.create_job(session, tenant="t", kind="train", name="lease",
                              request=train_request(1), summary=None, max_attempts=3)
    with session_scope(migrated_url) as session:
        assert jobs.claim_job(session, job_id=job.id, worker_id=worker_id) is not None
    return job.id


def row(migrated_url: str, job_id: str) -> tuple[int, datetime, float, str]:
    """(xmin, heartbeat_at, progress, state): xmin changes with every write to the row."""
    with psycopg.connect(sync_url(migrated_url)) as conn:
        found = conn.execute("SELECT xmin::text::bigint, heartbeat_at, progress, state "
                             "FROM jobs WHERE id = %s", (job_id,)).fetchone()
    assert found is not None
    return found


def test_cancel_is_noticed_within_two_seconds_with_a_5s_heartbeat(migrated_url):
    job_id = claimed_job(migrated_url)
    with Lease(db_url=migrated_url, job_id=job_id, worker_id="w", every_s=EVERY_S,
               progress=Progress()) as lease:
        time.sleep(1.5)  # between two of the per-second looks, well before the 5 s renewal
        assert not lease.should_stop()
        with session_scope(migrated_url) as session:
            jobs.cancel_job(session, job_id=job_id, tenant="t")
        canceled = time.monotonic()
        while not lease.should_stop() and time.monotonic() - canceled < 6:
            time.sleep(0.02)
        seen_after = time.monotonic() - canceled
        assert lease.should_stop(), "the cancel was never noticed"
        assert seen_after < 2.0, f"cancel noticed only after {seen_after:.2f}s"
    assert row(migrated_url, job_id)[3] == "canceled"


def test_renewal_comes_every_5s_and_the_looks_in_between_write_nothing(migrated_url):
    job_id = claimed_job(migrated_url)
    xmin0, beat0, progress0, _ = row(migrated_url, job_id)
    assert progress0 == 0.0

    # Every statement the lease thread sends, with its time since the lease started.
    sent: list[tuple[float, str]] = []
    start = [0.0]

    def record(conn, cursor, statement, parameters, context, executemany):  # type: ignore[no-untyped-def]
        if threading.current_thread().name == f"lease-{job_id}":
            words = statement.split()
            verb = words[0].upper()
            sent.append((time.monotonic() - start[0],
                         f"{verb} {words[1]}" if verb == "UPDATE" else verb))

    engine = get_engine(migrated_url)
    event.listen(engine, "before_cursor_execute", record)
    samples: list[tuple[float, int, datetime, float]] = []
    try:
        progress = Progress(value=0.375)
        started_utc = utcnow()
        start[0] = time.monotonic()
        with Lease(db_url=migrated_url, job_id=job_id, worker_id="w", every_s=EVERY_S,
                   progress=progress) as lease:
            while time.monotonic() - start[0] < EVERY_S + 1.5:
                xmin, beat, value, _ = row(migrated_url, job_id)
                samples.append((time.monotonic() - start[0], xmin, beat, value))
                time.sleep(0.1)
            assert not lease.should_stop()
    finally:
        event.remove(engine, "before_cursor_execute", record)

    # The database's view: the row untouched until the renewal at ~5 s, then progress written.
    early = [s for s in samples if s[0] < EVERY_S - 0.5]
    assert len(early) > 20
    assert all((x, b, v) == (xmin0, beat0, 0.0) for _, x, b, v in early), \
        "the row was written before the 5 s renewal"
    changed = [s for s in samples if (s[1], s[2], s[3]) != (xmin0, beat0, 0.0)]
    assert changed, "no renewal within 6.5 s"
    first_t, _, beat, value = changed[0]
    assert EVERY_S - 0.5 <= first_t <= EVERY_S + 1.5, first_t
    assert value == 0.375
    assert EVERY_S - 0.5 <= (beat - started_utc).total_seconds() <= EVERY_S + 1.0

    # The lease thread's view: a read-only look each second, one renewal at ~5 s: the job's
    # UPDATE, and with it the worker's row (its last_seen, GET /v1/workers).
    reads = [t for t, verb in sent if verb == "SELECT"]
    writes = [(t, verb) for t, verb in sent if verb != "SELECT"]
    assert len([t for t in reads if t < EVERY_S - 0.5]) >= 3, sent  # looks at ~1, 2, 3, 4 s
    assert [verb for _, verb in writes] == ["UPDATE jobs", "UPDATE workers"], sent
    assert all(EVERY_S - 0.5 <= t <= EVERY_S + 1.0 for t, _ in writes), sent


def test_one_thread_renews_every_lease_and_none_after_its_exit(migrated_url):
    """worker.lease._Keeper: leases held at once are all renewed by the process's one lease
    thread (no thread starts or ends with a job), and a lease that has exited writes no more."""
    first, second = claimed_job(migrated_url), claimed_job(migrated_url)
    with Lease(db_url=migrated_url, job_id=first, worker_id="w", every_s=0.2,
               progress=Progress(value=0.25)):
        threads = {t.ident for t in threading.enumerate()}
        with Lease(db_url=migrated_url, job_id=second, worker_id="w", every_s=0.2,
                   progress=Progress(value=0.5)):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (
                    row(migrated_url, first)[2] == 0.25 and row(migrated_url, second)[2] == 0.5):
                time.sleep(0.05)
            assert row(migrated_url, first)[2] == 0.25 and row(migrated_url, second)[2] == 0.5
            assert {t.ident for t in threading.enumerate()} == threads
        after_exit = row(migrated_url, second)[:2]
        before = row(migrated_url, first)[1]
        time.sleep(0.8)  # four periods of 0.2 s
        assert row(migrated_url, second)[:2] == after_exit  # nothing written once it exited
        assert row(migrated_url, first)[1] > before  # while the other lease goes on renewing
    assert {t.ident for t in threading.enumerate()} == threads
