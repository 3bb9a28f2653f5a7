"""Thin tasks: a job id in, the real work in worker.runner."""

from __future__ import annotations

from convoy.queue import FEATURE_MAPS_TASK, TRAIN_TASK, enqueue
from worker.app import app, settings, worker_id
from worker.runner import run_job


def run(job_id: str, kind: str) -> str:
    outcome = run_job(job_id, settings=settings, worker_id=worker_id())
    if outcome == "deferred":
        # Its tenant is at max_running_per_tenant: this worker moves on to other tenants' jobs
        # and the message comes back later (the reconciler resends it if this one is lost).
        enqueue(app, kind=kind, job_id=job_id, countdown=settings.tenant_defer_seconds)
    return outcome


@app.task(name=TRAIN_TASK)
def train_task(job_id: str) -> str:
    return run(job_id, "train")


@app.task(name=FEATURE_MAPS_TASK)
def feature_maps_task(job_id: str) -> str:
    return run(job_id, "feature_maps")
