"""The reconciler: nothing submitted is ever lost. It runs as a thread in every API process
(always there, in embedded and compose modes alike); conditional updates make two of them
running at once harmless."""

from __future__ import annotations

import logging
import threading

from celery import Celery

from convoy.queue import enqueue
from convoy.settings import Settings
from db import jobs
from db.session import session_scope
from db.tables import Job

log = logging.getLogger(__name__)


def reconcile_once(settings: Settings, celery: Celery) -> dict[str, list[str]]:
    """Requeue running jobs whose lease expired; resend queued jobs whose message may be
    lost. Returns the ids it acted on."""
    with session_scope(settings.database_url) as session:
        expired = jobs.requeue_expired(session, lease_seconds=settings.lease_seconds)
        stale = jobs.stale_queued(session, older_than_seconds=settings.requeue_after_seconds)
        kinds = {j.id: j.kind for j in session.query(Job).filter(Job.id.in_(expired + stale))}
    for job_id in dict.fromkeys(expired + stale):
        enqueue(celery, kind=kinds[job_id], job_id=job_id)
    return {"requeued": expired, "resent": stale}


class Reconciler:
    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings, self.celery = settings, celery
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_seconds):
            try:
                acted = reconcile_once(self.settings, self.celery)
                if acted["requeued"] or acted["resent"]:
                    log.info("reconciler: %s", acted)
            except Exception:  # database or broker down: try again next tick
                log.warning("reconciler pass failed", exc_info=True)
