"""Thin tasks: a job id in, the real work in worker.runner."""

from __future__ import annotations

from convoy.jobspec import DEFAULT_PRIORITY
from convoy.queue import (
    EVALUATE_TASK,
    EXPORT_TASK,
    FEATURE_MAPS_TASK,
    INVARIANCE_TASK,
    TRAIN_TASK,
    enqueue,
    resend,
)
from db import dispatch, job_reads
from db.session import session_scope
from worker import warmup
from worker.app import app, settings, worker_id
from worker.control import RunOutcome
from worker.lease import SHUTTING_DOWN
from worker.presence import PRESENCE
from worker.runner import run_job, store_backoff


def send_again(job_id: str, kind: str, countdown: float | None = None) -> None:
    """The job's message once more, to the queue it came from (a GPU job to the GPU queue),
    with its priority."""
    with session_scope(settings.database_url) as session:
        route = dispatch.routes_of(session, job_ids=[job_id]).get(job_id)
    if route is None:  # no row to route by: the kind's default queue and priority
        enqueue(app, kind=kind, job_id=job_id, countdown=countdown, priority=DEFAULT_PRIORITY)
    else:
        resend(app, job_id=job_id, route=route, countdown=countdown)


def run(job_id: str, kind: str) -> RunOutcome:
    warmup.wait()  # before the check below: a shutdown may begin during the warm-up
    if SHUTTING_DOWN.is_set():
        # A message that reaches a worker already stopping (its own handed-back job among
        # them): sent on to the next worker, nothing claimed.
        send_again(job_id, kind)
        return RunOutcome.PASSED_ON
    PRESENCE.set("busy", job_id)
    try:
        outcome = run_job(job_id, settings=settings, worker_id=worker_id())
    finally:
        PRESENCE.set("stopping" if SHUTTING_DOWN.is_set() else "idle")
    if outcome == RunOutcome.RELEASED:
        # This worker is shutting down; the job is queued again for the next free worker
        # (should this send be lost, the reconciler resends queued jobs).
        send_again(job_id, kind)
    elif outcome == RunOutcome.REQUEUED:
        send_again(job_id, kind)  # a lost rank: the next attempt resumes at once
    elif outcome == RunOutcome.RETRY:
        # A storage error (full or read-only store): the job is queued again and its message
        # comes back after the backoff (the reconciler resends it if this one is lost).
        with session_scope(settings.database_url) as session:
            attempt = job_reads.get_job(session, job_id=job_id).attempt
        send_again(job_id, kind, countdown=store_backoff(settings, attempt - 1))
    elif outcome == RunOutcome.DEFERRED:
        # Its tenant is at max_running_per_tenant: this worker moves on to other tenants' jobs
        # and the message comes back later (the reconciler resends it if this one is lost).
        send_again(job_id, kind, countdown=settings.tenant_defer_seconds)
    return outcome


@app.task(name=TRAIN_TASK)
def train_task(job_id: str) -> str:
    return run(job_id, "train")


@app.task(name=FEATURE_MAPS_TASK)
def feature_maps_task(job_id: str) -> str:
    return run(job_id, "feature_maps")


@app.task(name=INVARIANCE_TASK)
def invariance_task(job_id: str) -> str:
    return run(job_id, "invariance")


@app.task(name=EVALUATE_TASK)
def evaluate_task(job_id: str) -> str:
    return run(job_id, "evaluate")


@app.task(name=EXPORT_TASK)
def export_task(job_id: str) -> str:
    return run(job_id, "export")
