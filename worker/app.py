"""The worker's Celery app: `celery -A worker.app worker --pool solo`. One task at a time;
with CUDA, one solo worker process per GPU (forked children break CUDA)."""

from __future__ import annotations

import os
import socket
from typing import Any

from celery.signals import (
    celeryd_after_setup,
    worker_process_init,
    worker_ready,
    worker_shutting_down,
)

from convoy.queue import make_celery
from convoy.settings import get_settings
from db.session import configure_pools
from worker import warmup
from worker.devices import owned as owned_devices
from worker.lease import SHUTTING_DOWN
from worker.presence import PRESENCE

settings = get_settings()
configure_pools(timeout_seconds=settings.db_pool_timeout_seconds)
app = make_celery(settings, include=["worker.tasks"])
# what multi-device jobs may use here; a bad CONVOY_WORKER_DEVICES stops the worker at start
OWNED = owned_devices(settings)


def worker_id() -> str:
    return settings.worker_id or f"{socket.gethostname()}:{os.getpid()}"


def set_threads() -> None:
    import torch

    torch.set_num_threads(settings.torch_threads)


set_threads()
worker_process_init.connect(lambda **_: set_threads(), weak=False)
# Warm shutdown (SIGTERM, first Ctrl-C) stops a training job between steps and hands it
# back to the queue (worker.runner); a cold shutdown (second signal, SIGQUIT) does not wait.
def _shutting_down(**_: object) -> None:
    SHUTTING_DOWN.set()
    PRESENCE.set("stopping", PRESENCE.job)


def _ready(sender: object = None, **_: object) -> None:
    """Report this worker (and its queues) in the workers table, then every heartbeat."""
    consumer = getattr(sender, "task_consumer", None)
    queues = [q.name for q in getattr(consumer, "queues", None) or []] or [settings.queue]
    PRESENCE.start(settings, worker_id=worker_id(), queues=queues)


def _after_setup(sender: object = None, instance: Any = None, **_: object) -> None:
    """Read the device-count queues this worker's devices allow (a job asking for N devices
    waits in one read only by workers owning at least N; convoy.queue.devices_queue)."""
    from worker.devices import device_count_queues

    queues = instance.app.amqp.queues
    for name in device_count_queues(settings, list(queues.consume_from or queues), OWNED):
        queues.select_add(name)


def _warm_up(**_: object) -> None:
    """The warm-up before the worker says ready: its consumer takes no message until then, so
    the first job costs what the next ones do, and in a fleet a job sent meanwhile goes to a
    worker already warm instead of waiting here."""
    warmup.start()
    warmup.wait()


worker_shutting_down.connect(_shutting_down, weak=False)
celeryd_after_setup.connect(_after_setup, weak=False)
if settings.worker_warm_up:
    worker_ready.connect(_warm_up, weak=False)  # first: the presence row says idle once warm
worker_ready.connect(_ready, weak=False)
