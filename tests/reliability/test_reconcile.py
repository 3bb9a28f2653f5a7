"""The reconciler and the lease transitions against a real PostgreSQL and Redis, without
workers: lost messages are resent and present ones are not; expired leases requeue or fail;
a late worker cannot write; a retried epoch write does not duplicate metrics."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import func, select, update

from api.reconciler import reconcile_once
from convoy.queue import enqueue, gpu_queue, make_celery
from convoy.queue_inspect import job_id_of, redis_queue_keys
from convoy.settings import Settings
from db import dispatch, job_reads, jobs, leases
from db.base import utcnow
from db.migrate import upgrade
from db.session import session_scope
from db.tables import Job, JobAttempt, Metric
from tests.reliability.infra import tiny_job
from tests.services import REDIS, create_pg_database, drop_pg_database


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    url = create_pg_database()
    upgrade(url)
    queue = f"convoy-rec-{uuid.uuid4().hex[:8]}"
    yield Settings(home=tmp_path_factory.mktemp("rec"), database_url=url,
                   broker_url=f"{REDIS}/0", queue=queue, requeue_after_seconds=30,
                   lease_seconds=30)
    redis.Redis.from_url(f"{REDIS}/0").delete(*redis_queue_keys(queue))
    drop_pg_database(url)


def make_jobs(settings: Settings, n: int, *, age_s: float) -> list[str]:
    then = utcnow() - timedelta(seconds=age_s)
    with session_scope(settings.database_url) as session:
        made = [jobs.create_job(session, tenant="t", kind="train", name="x",
                                request=tiny_job(), summary=None, max_attempts=2)
                for _ in range(n)]
        for job in made:
            job.created_at = job.enqueued_at = then
        return [job.id for job in made]


def queued_messages(settings: Settings) -> list[str]:
    r = redis.Redis.from_url(settings.broker_url)
    return [job_id_of(m) or "?" for key in redis_queue_keys(settings.queue)
            for m in r.lrange(key, 0, -1)]


def test_reconciler_resends_exactly_the_lost_messages(settings):
    celery = make_celery(settings)
    ids = make_jobs(settings, 40, age_s=60)
    for job_id in ids:
        enqueue(celery, kind="train", job_id=job_id)
    assert sorted(queued_messages(settings)) == sorted(ids)

    # every queued job has its message: a long backlog costs no duplicates
    assert reconcile_once(settings, celery) == {"requeued": [], "resent": []}
    assert len(queued_messages(settings)) == 40

    # Redis lost five of them
    r = redis.Redis.from_url(settings.broker_url)
    lost = set(ids[10:15])
    for raw in r.lrange(settings.queue, 0, -1):
        if job_id_of(raw) in lost:
            r.lrem(settings.queue, 1, raw)
    assert reconcile_once(settings, celery)["resent"] == sorted(lost, key=ids.index)
    assert sorted(queued_messages(settings)) == sorted(ids)
    # resent jobs are marked sent: the next pass does nothing
    assert reconcile_once(settings, celery) == {"requeued": [], "resent": []}
    r.delete(*redis_queue_keys(settings.queue))
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(state="canceled"))


def test_without_broker_inspection_resends_back_off_per_job(settings):
    now = utcnow()
    ids = make_jobs(settings, 3, age_s=100)
    with session_scope(settings.database_url) as session:
        # sent at submission, 40 s ago, 70 s ago (having waited 60 s, 30 s before that)
        for job_id, sent_ago in zip(ids, (100, 40, 70), strict=True):
            session.execute(update(Job).where(Job.id == job_id)
                            .values(enqueued_at=now - timedelta(seconds=sent_ago)))
    with session_scope(settings.database_url) as session:
        due = dispatch.stale_queued(session, older_than_seconds=30, now=now,
                                max_backoff_seconds=300)
        every_pass = dispatch.stale_queued(session, older_than_seconds=30, now=now)
        dispatch.mark_sent(session, job_ids=ids)
        session.execute(update(Job).where(Job.id.in_(ids)).values(state="canceled"))
    assert [i for i, _ in due if i in ids] == [ids[0], ids[2]]
    assert {i for i, _ in every_pass} >= set(ids)


def test_expired_lease_requeues_then_fails_and_the_late_worker_cannot_write(settings):
    [job_id] = make_jobs(settings, 1, age_s=0)
    later = utcnow() + timedelta(seconds=31)
    with session_scope(settings.database_url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id="a") is not None
        assert jobs.claim_job(session, job_id=job_id, worker_id="b") is None  # duplicate
        assert jobs.requeue_expired(session, lease_seconds=30) == []  # lease still fresh
        assert jobs.requeue_expired(session, lease_seconds=30, now=later) == [job_id]
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.attempt, job.worker_id) == ("queued", 2, None)
        # the first worker wakes up: every write it tries is refused
        assert not leases.heartbeat(session, job_id=job_id, worker_id="a")
        assert not jobs.record_epoch(session, job_id=job_id, worker_id="a", epoch=1, step=1,
                                     metrics={"val_loss": 1.0}, progress=0.5)
        assert not jobs.finish_job(session, job_id=job_id, worker_id="a", state="succeeded")

        assert jobs.claim_job(session, job_id=job_id, worker_id="b") is not None
        assert jobs.requeue_expired(session, lease_seconds=30,
                                    now=utcnow() + timedelta(seconds=31)) == []
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert job.state == "failed" and "max_attempts (2)" in (job.error or "")
        assert session.scalar(select(func.count()).select_from(Metric)
                              .where(Metric.job_id == job_id)) == 0


def test_a_retried_epoch_write_records_each_metric_once(settings):
    [job_id] = make_jobs(settings, 1, age_s=0)
    with session_scope(settings.database_url) as session:
        jobs.claim_job(session, job_id=job_id, worker_id="w")
        for _ in range(2):  # the reply to the first commit was lost; the worker retries
            assert jobs.record_epoch(session, job_id=job_id, worker_id="w", epoch=1, step=4,
                                     metrics={"train_loss": 0.5, "val_loss": 0.6},
                                     progress=0.5)
        rows = session.execute(select(Metric.name, Metric.epoch).where(Metric.job_id == job_id)
                               .order_by(Metric.name)).all()
        assert rows == [("train_loss", 1), ("val_loss", 1)]


def test_release_hands_back_only_a_job_this_worker_still_runs(settings):
    """A stopping worker's release: queued again with attempt + 1 and max_attempts + 1; a
    second release, another worker's, or one after a cancel changes nothing and leaves the
    attempt for the caller to end as it really ended."""
    [job_id, canceled] = make_jobs(settings, 2, age_s=0)
    with session_scope(settings.database_url) as session:
        assert jobs.claim_job(session, job_id=job_id, worker_id="w") is not None
        before = job_reads.get_job(session, job_id=job_id).max_attempts
        assert not jobs.release_job(session, job_id=job_id, worker_id="other")
        assert jobs.release_job(session, job_id=job_id, worker_id="w")
        assert not jobs.release_job(session, job_id=job_id, worker_id="w")
        session.expire_all()
        job = job_reads.get_job(session, job_id=job_id)
        assert (job.state, job.attempt, job.max_attempts, job.worker_id) == (
            "queued", 2, before + 1, None)
        assert session.scalars(select(JobAttempt.outcome).where(
            JobAttempt.job_id == job_id)).all() == ["released"]

        assert jobs.claim_job(session, job_id=canceled, worker_id="w") is not None
        jobs.cancel_job(session, job_id=canceled, tenant=None)
        assert not jobs.release_job(session, job_id=canceled, worker_id="w")
        attempt = session.scalars(select(JobAttempt).where(JobAttempt.job_id == canceled)).one()
        assert attempt.ended_at is None  # not marked "lost": the runner records "canceled"
        assert job_reads.job_state(session, job_id=canceled) == "canceled"


def test_gpu_jobs_are_sent_held_and_resent_on_the_gpu_queue(settings):
    celery = make_celery(settings)
    r = redis.Redis.from_url(settings.broker_url)
    gpu_key = gpu_queue(settings.queue)
    [cpu_job, gpu_job] = make_jobs(settings, 2, age_s=60)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == gpu_job).values(
            request={**tiny_job(), "device": "cuda"}))
    for job_id, gpu in ((cpu_job, False), (gpu_job, True)):
        enqueue(celery, kind="train", job_id=job_id, gpu=gpu)
    assert [job_id_of(m) for m in r.lrange(settings.queue, 0, -1)] == [cpu_job]
    assert [job_id_of(m) for m in r.lrange(gpu_key, 0, -1)] == [gpu_job]
    # a message waiting on the GPU queue counts as held: nothing is resent
    assert reconcile_once(settings, celery) == {"requeued": [], "resent": []}
    # both lost (a Redis restart): each is resent to its own queue
    r.delete(*redis_queue_keys(settings.queue), *redis_queue_keys(gpu_key))
    assert sorted(reconcile_once(settings, celery)["resent"]) == sorted([cpu_job, gpu_job])
    assert [job_id_of(m) for m in r.lrange(settings.queue, 0, -1)] == [cpu_job]
    assert [job_id_of(m) for m in r.lrange(gpu_key, 0, -1)] == [gpu_job]
    r.delete(*redis_queue_keys(settings.queue), *redis_queue_keys(gpu_key))
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_([cpu_job, gpu_job]))
                        .values(state="canceled"))
