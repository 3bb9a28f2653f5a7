"""The reconciler: nothing submitted is ever lost. It runs as a thread in every API process
(always there, in embedded and compose modes alike); conditional updates make two of them
running at once harmless."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from typing import Any

from celery import Celery

from convoy.queue import enqueue, gpu_queue
from convoy.settings import Settings
from db import jobs
from db.session import session_scope

log = logging.getLogger(__name__)

# kombu's Redis transport keeps one list per priority step: "q", "q\x06\x163", ...
REDIS_PRIORITY_SEP = "\x06\x16"
REDIS_PRIORITY_STEPS = (0, 3, 6, 9)


def _job_id_of(raw: bytes | str) -> str | None:
    """The job id a Celery message carries (its only argument), or None if unreadable."""
    try:
        message = json.loads(raw)
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def redis_queue_keys(queue: str) -> list[str]:
    return [queue if p == 0 else f"{queue}{REDIS_PRIORITY_SEP}{p}" for p in REDIS_PRIORITY_STEPS]


def redis_held_ids(settings: Settings, *, queued: int) -> set[str] | None:
    """Job ids with a message waiting in the Redis broker's lists for our queues (the main one
    and the GPU one).

    None when the lists hold at least `queued` messages: nothing looks lost, so they are not
    read (a backlog of thousands costs one LLEN per pass, not a scan). Delivered-but-unacked
    messages do not count: the worker that took one may have died before claiming the job,
    and Redis would hand it out again only after the visibility timeout (days)."""
    import redis

    client = redis.Redis.from_url(settings.broker_url, socket_timeout=5)
    try:
        keys = redis_queue_keys(settings.queue) + redis_queue_keys(gpu_queue(settings.queue))
        pipe = client.pipeline()
        for key in keys:
            pipe.llen(key)
        if sum(pipe.execute()) >= queued:
            return None
        pipe = client.pipeline()
        for key in keys:
            pipe.lrange(key, 0, -1)
        held: set[str] = set()
        for chunk in pipe.execute():
            held.update(i for i in map(_job_id_of, chunk) if i)
        return held
    finally:
        client.close()


def reconcile_once(settings: Settings, celery: Celery, *, expire_leases: bool = True
                   ) -> dict[str, list[str]]:
    """Requeue running jobs whose lease expired; close attempt rows their dead worker left
    open; resend queued jobs whose message is lost. Returns the ids it acted on."""
    inspect_redis = settings.broker_url.startswith(("redis://", "rediss://"))
    with session_scope(settings.database_url) as session:
        expired = jobs.requeue_expired(session, lease_seconds=settings.lease_seconds) \
            if expire_leases else []
        closed = jobs.close_orphaned_attempts(session, lease_seconds=settings.lease_seconds) \
            if expire_leases else []
        # With Redis we can see which messages exist, so resend exactly the missing ones;
        # other brokers get a per-job backoff instead.
        due = jobs.stale_queued(
            session, older_than_seconds=settings.requeue_after_seconds,
            max_backoff_seconds=None if inspect_redis else 10 * settings.requeue_after_seconds,
        )
        queued = jobs.count_queued(session) if due and inspect_redis else 0
        routes = jobs.routes_of(session, job_ids=[*expired, *(i for i, _ in due)])
    if due and inspect_redis:
        held = redis_held_ids(settings, queued=queued)
        due = [] if held is None else [(i, k) for i, k in due if i not in held]
    sent: list[str] = []
    try:
        for job_id in expired:
            kind, gpu = routes[job_id]
            enqueue(celery, kind=kind, job_id=job_id, gpu=gpu)
        for job_id, _ in due:
            kind, gpu = routes[job_id]
            enqueue(celery, kind=kind, job_id=job_id, gpu=gpu)
            sent.append(job_id)
    finally:
        if sent:
            with session_scope(settings.database_url) as session:
                jobs.mark_sent(session, job_ids=sent)
    if closed:
        log.info("reconciler: closed orphaned attempts %s", closed)
    return {"requeued": expired, "resent": sent}


class Reconciler:
    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings, self.celery = settings, celery
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        # After a failed pass (the database may have been down, and with it every worker's
        # heartbeat) leases get a full lease period again before they can expire.
        self._failed_at: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_seconds):
            self.pass_once()
            self.purge_idempotency_keys()

    _purged_at = 0.0

    def purge_idempotency_keys(self, *, every_s: float = 60.0) -> int:
        """Idempotency keys past idempotency_ttl_seconds are deleted (at most once a minute)."""
        if time.monotonic() - self._purged_at < every_s:
            return 0
        self._purged_at = time.monotonic()
        from db.idempotency import purge_expired

        try:
            with session_scope(self.settings.database_url) as session:
                return purge_expired(session, ttl_seconds=self.settings.idempotency_ttl_seconds)
        except Exception:  # the database is down: next time
            log.warning("purge of expired idempotency keys failed", exc_info=True)
            return 0

    def pass_once(self) -> dict[str, Any] | None:
        grace = self._failed_at is not None and \
            time.monotonic() - self._failed_at < self.settings.lease_seconds
        try:
            acted = reconcile_once(self.settings, self.celery, expire_leases=not grace)
        except Exception:  # database or broker down: try again next tick
            log.warning("reconciler pass failed", exc_info=True)
            self._failed_at = time.monotonic()
            return None
        if acted["requeued"] or acted["resent"]:
            log.info("reconciler: %s", acted)
        return acted
