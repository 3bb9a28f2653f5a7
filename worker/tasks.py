"""Thin tasks: a job id in, the real work in worker.runner."""

from __future__ import annotations

from convoy.queue import FEATURE_MAPS_TASK, TRAIN_TASK
from worker.app import app, settings, worker_id
from worker.runner import run_job


@app.task(name=TRAIN_TASK)
def train_task(job_id: str) -> str:
    return run_job(job_id, settings=settings, worker_id=worker_id())


@app.task(name=FEATURE_MAPS_TASK)
def feature_maps_task(job_id: str) -> str:
    return run_job(job_id, settings=settings, worker_id=worker_id())
