"""Thin tasks: a job id in, the real work in worker.runner."""

from __future__ import annotations

from convoy.queue import FEATURE_MAPS_TASK, TRAIN_TASK, enqueue
from worker import warmup
from worker.app import app, settings, worker_id
from worker.lease import SHUTTING_DOWN
from worker.runner import run_job


def run(job_id: str, kind: str) -> str:
    warmup.wait()  # before the check below: a shutdown may begin during the warm-up
    if SHUTTING_DOWN.is_set():
        # A message that reaches a worker already stopping (its own handed-back job among
        # them): sent on to the next worker, nothing claimed.
        enqueue(app, kind=kind, job_id=job_id)
        return "passed on"
    outcome = run_job(job_id, settings=settings, worker_id=worker_id())
    if outcome == "released":
        # This worker is shutting down; the job is queued again for the next free worker
        # (should this send be lost, the reconciler resends queued jobs).
        enqueue(app, kind=kind, job_id=job_id)
    elif outcome == "deferred":
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
