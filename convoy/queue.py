"""The Celery configuration both sides share. The API only sends task names with a job id;
the worker (worker/app.py) adds the tasks. JSON only, never pickle."""

from __future__ import annotations

from celery import Celery

from convoy.settings import Settings

TRAIN_TASK = "convoy.train"
FEATURE_MAPS_TASK = "convoy.feature_maps"
TASK_FOR_KIND = {"train": TRAIN_TASK, "feature_maps": FEATURE_MAPS_TASK}


def make_celery(settings: Settings, *, include: list[str] | None = None) -> Celery:
    app = Celery("convoy", broker=settings.broker_url, include=include or [])
    transport_options: dict[str, object] = {
        # Longer than any job: Redis would hand an unacked long job to a second worker
        # after the default hour (the lease still makes that a no-op).
        "visibility_timeout": settings.visibility_timeout_seconds,
    }
    if settings.broker_url.startswith("sqla+"):
        from kombu.transport import sqlalchemy as kombu_sqla

        # This transport hands every transport option to create_engine, so the polling
        # interval (1 s by default: slow dispatch) can only be set on the class.
        kombu_sqla.Transport.polling_interval = settings.broker_polling_interval
        transport_options = {"connect_args": {"timeout": 30}}
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=settings.queue,
        task_routes={"convoy.*": {"queue": settings.queue}},
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_default_delivery_mode="persistent",
    )
    return app


def gpu_queue(queue: str) -> str:
    """Where jobs that ask for `device: cuda` wait: only workers with a GPU read it (a CPU
    worker in a mixed fleet would fail them), and every worker reads the main queue."""
    return f"{queue}-gpu"


def devices_queue(base: str, devices: int) -> str:
    """Where jobs asking for `devices` > 1 wait: one queue per exact device count, read by
    every worker that owns at least that many (worker_queues), so no job waits for a worker
    that could run it but does not read its queue, and none reaches a worker too small."""
    return base if devices <= 1 else f"{base}-x{devices}"


def queue_for(queue: str, device: str | None, devices: int = 1) -> str:
    """The one rule for where a job's message goes: a job that asks for `device: cuda` to the
    GPU queue, every other one (auto, cpu) to the main queue; either suffixed with its device
    count when it asks for more than one (devices_queue)."""
    return devices_queue(gpu_queue(queue) if device == "cuda" else queue, devices)


def worker_queues(queue: str, *, gpu: bool, owned: int, max_devices: int) -> list[str]:
    """The queues a worker reads: the main one (and the GPU one when `gpu`), and for each
    device count 2..min(owned, max_devices) the matching device-count queue(s)."""
    bases = [queue, *([gpu_queue(queue)] if gpu else [])]
    return [devices_queue(base, n) for base in bases
            for n in range(1, min(owned, max_devices) + 1)]


def all_queues(queue: str, *, max_devices: int) -> list[str]:
    """Every queue a job's message may be sent to (queue inspection, the fleet page)."""
    return worker_queues(queue, gpu=True, owned=max_devices, max_devices=max_devices)


def enqueue(app: Celery, *, kind: str, job_id: str, device: str | None = None,
            devices: int = 1, countdown: float | None = None) -> None:
    """Send the job's message (its id only) to the queue its device (and count) asks for."""
    app.send_task(TASK_FOR_KIND[kind], args=[job_id], countdown=countdown,
                  queue=queue_for(app.conf.task_default_queue, device, devices))
