"""The reconciler: nothing submitted is ever lost. It runs as a thread in every API process
(always there, in embedded and compose modes alike); conditional updates make two of them
running at once harmless."""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from api.ticker import Ticker
from convoy.queue import resend
from convoy.queue_inspect import redis_held_ids
from convoy.settings import Settings
from db import attempts, dispatch, jobs
from db.session import session_scope

log = logging.getLogger(__name__)

WORKER_ROWS_KEPT_SECONDS = 24 * 3600.0

def reconcile_once(settings: Settings, celery: Celery, *, expire_leases: bool = True
                   ) -> dict[str, list[str]]:
    """Requeue running jobs whose lease expired; close attempt rows their dead worker left
    open; resend queued jobs whose message is lost. Returns the ids it acted on."""
    inspect_redis = settings.broker_url.startswith(("redis://", "rediss://"))
    with session_scope(settings.database_url) as session:
        expired = jobs.requeue_expired(session, lease_seconds=settings.lease_seconds) \
            if expire_leases else []
        closed = attempts.close_orphaned(session, lease_seconds=settings.lease_seconds) \
            if expire_leases else []
        # With Redis we can see which messages exist, so resend exactly the missing ones;
        # other brokers get a per-job backoff instead.
        due = dispatch.stale_queued(
            session, older_than_seconds=settings.requeue_after_seconds,
            max_backoff_seconds=None if inspect_redis else 10 * settings.requeue_after_seconds,
        )
        queued = dispatch.count_queued(session) if due and inspect_redis else 0
        routes = dispatch.routes_of(session, job_ids=[*expired, *(i for i, _ in due)])
    if due and inspect_redis:
        held = redis_held_ids(settings, queued=queued)
        due = [] if held is None else [(i, k) for i, k in due if i not in held]
    sent: list[str] = []
    try:
        # resent with the job's own priority, read from its request
        for job_id in expired:
            resend(celery, job_id=job_id, route=routes[job_id])
        for job_id, _ in due:
            resend(celery, job_id=job_id, route=routes[job_id])
            sent.append(job_id)
    finally:
        if sent:
            with session_scope(settings.database_url) as session:
                dispatch.mark_sent(session, job_ids=sent)
    if closed:
        log.info("reconciler: closed orphaned attempts %s", closed)
    return {"requeued": expired, "resent": sent}


class Reconciler(Ticker):
    def __init__(self, settings: Settings, celery: Celery) -> None:
        super().__init__("reconciler")
        self.settings, self.celery = settings, celery
        # After a failed pass (the database may have been down, and with it every worker's
        # heartbeat) leases get a full lease period again before they can expire.
        self._failed_at: float | None = None

    def interval(self) -> float:
        return self.settings.reconcile_interval_seconds

    def tick(self) -> None:
        self.pass_once()
        self.purge_idempotency_keys()
        self.purge_workers()

    _workers_purged_at = 0.0

    def purge_workers(self, *, every_s: float = 600.0) -> int:
        """Rows of workers unseen for a day go (at most every 10 minutes); GET /v1/workers
        shows only the live ones anyway."""
        if time.monotonic() - self._workers_purged_at < every_s:
            return 0
        self._workers_purged_at = time.monotonic()
        from db.workers import purge

        try:
            with session_scope(self.settings.database_url) as session:
                return purge(session, unseen_seconds=max(
                    WORKER_ROWS_KEPT_SECONDS, 10 * self.settings.worker_seen_seconds))
        except Exception:  # the database is down: next time
            log.warning("purge of old worker rows failed", exc_info=True)
            return 0

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
