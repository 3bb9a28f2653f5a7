"""The reconciler against a real PostgreSQL and Redis, without workers: lost messages are
resent and present ones are not, each to its own queue; without broker inspection, resends
back off per job. (The lease transitions themselves: tests/db/test_transitions.py.)"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
import redis
from sqlalchemy import update

from api.reconciler import reconcile_once
from convoy.queue import enqueue, gpu_queue, make_celery
from convoy.queue_inspect import job_id_of, redis_queue_keys
from convoy.settings import Settings
from db import dispatch, jobs
from db.base import utcnow
from db.migrate import upgrade
from db.session import session_scope
from db.tables import Job
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


def ids_on(r: redis.Redis, queue: str) -> list[str]:
    """Job ids waiting on a queue, in every priority list of it."""
    return [job_id_of(m) or "?" for key in redis_queue_keys(queue) for m in r.lrange(key, 0, -1)]


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
    for key in redis_queue_keys(settings.queue):
        for raw in r.lrange(key, 0, -1):
            if job_id_of(raw) in lost:
                r.lrem(key, 1, raw)
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


def test_gpu_jobs_are_sent_held_and_resent_on_the_gpu_queue(settings):
    celery = make_celery(settings)
    r = redis.Redis.from_url(settings.broker_url)
    gpu_key = gpu_queue(settings.queue)
    [cpu_job, gpu_job] = make_jobs(settings, 2, age_s=60)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id == gpu_job).values(
            request={**tiny_job(), "device": "cuda"}))
    for job_id, device in ((cpu_job, "auto"), (gpu_job, "cuda")):
        enqueue(celery, kind="train", job_id=job_id, device=device)
    assert ids_on(r, settings.queue) == [cpu_job]
    assert ids_on(r, gpu_key) == [gpu_job]
    # a message waiting on the GPU queue counts as held: nothing is resent
    assert reconcile_once(settings, celery) == {"requeued": [], "resent": []}
    # both lost (a Redis restart): each is resent to its own queue
    r.delete(*redis_queue_keys(settings.queue), *redis_queue_keys(gpu_key))
    assert sorted(reconcile_once(settings, celery)["resent"]) == sorted([cpu_job, gpu_job])
    assert ids_on(r, settings.queue) == [cpu_job]
    assert ids_on(r, gpu_key) == [gpu_job]
    r.delete(*redis_queue_keys(settings.queue), *redis_queue_keys(gpu_key))
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_([cpu_job, gpu_job]))
                        .values(state="canceled"))


def test_resent_messages_keep_the_jobs_priority(settings):
    """kombu's Redis transport keeps one list per priority (0 served first), so a job's
    priority p (9 most urgent) waits on the list 9 - p; a resent message must land there."""
    celery = make_celery(settings)
    r = redis.Redis.from_url(settings.broker_url)
    ids = make_jobs(settings, 3, age_s=60)
    priorities = dict(zip(ids, (9, 0, 5), strict=True))
    with session_scope(settings.database_url) as session:
        for job_id, priority in priorities.items():
            session.execute(update(Job).where(Job.id == job_id).values(
                request={**tiny_job(), "priority": priority}))
    keys = redis_queue_keys(settings.queue)
    assert sorted(reconcile_once(settings, celery)["resent"]) == sorted(ids)
    for job_id, priority in priorities.items():
        [message] = [m for m in r.lrange(keys[9 - priority], 0, -1) if job_id_of(m) == job_id]
        assert json.loads(message)["properties"]["priority"] == 9 - priority
    assert sorted(queued_messages(settings)) == sorted(ids)
    r.delete(*keys)
    with session_scope(settings.database_url) as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(state="canceled"))
