"""The Celery configuration both sides share. The API only sends task names with a job id;
the worker (worker/app.py) adds the tasks. JSON only, never pickle."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from celery import Celery

from convoy.jobspec import DEFAULT_PRIORITY
from convoy.settings import Settings

if TYPE_CHECKING:
    from db.dispatch import Route

TRAIN_TASK = "convoy.train"
FEATURE_MAPS_TASK = "convoy.feature_maps"
INVARIANCE_TASK = "convoy.invariance"
EVALUATE_TASK = "convoy.evaluate"
EXPORT_TASK = "convoy.export"
TASK_FOR_KIND = {"train": TRAIN_TASK, "feature_maps": FEATURE_MAPS_TASK,
                 "invariance": INVARIANCE_TASK, "evaluate": EVALUATE_TASK,
                 "export": EXPORT_TASK}


# Redis: one list per priority level (kombu's default is 4 bands, 0/3/6/9), polled in order
# by every BRPOP, so a waiting message of a higher band is always taken first.
REDIS_PRIORITY_STEPS = list(range(10))
# The embedded (SQLAlchemy) broker: how many waiting messages a poll looks at for the most
# urgent one.
SQL_PRIORITY_SCAN = 1000


def broker_priority(broker_url: str, priority: int) -> int:
    """The message priority for a job priority (0..9, 9 most urgent). kombu's Redis transport
    serves priority 0 first, so it is reversed there; the embedded broker (and AMQP) take
    the higher number first."""
    return 9 - priority if broker_url.startswith(("redis://", "rediss://")) else priority


def _message_priority(payload: Any) -> int:
    try:
        value = json.loads(payload)["properties"].get("priority") or 0
        return int(value) if isinstance(value, int | float) else 0
    except (ValueError, KeyError, TypeError, AttributeError):
        return 0


def _broker_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # The embedded broker's SQLite file as the app database's: WAL, and no fsync per commit
    # (each message is two commits, its send and its take). A power cut may lose the last
    # messages, never corrupt the file; the reconciler sends a queued job's message again.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _prioritised_sqla_channel() -> Any:
    """kombu's SQLAlchemy channel, taking the most urgent of the first SQL_PRIORITY_SCAN
    waiting messages (oldest first among equals) instead of the oldest one: that transport
    has no priorities of its own."""
    from kombu.transport import sqlalchemy as kombu_sqla
    from kombu.transport.virtual import Empty
    from kombu.utils.encoding import bytes_to_str
    from sqlalchemy import event, text

    from convoy import brokerwake

    class PriorityChannel(kombu_sqla.Channel):
        def _engine_from_config(self) -> Any:
            engine = super()._engine_from_config()
            if engine.dialect.name == "sqlite":
                event.listen(engine, "connect", _broker_pragmas)
            return engine

        def _put(self, queue: Any, *args: Any, **kwargs: Any) -> None:
            super()._put(queue, *args, **kwargs)  # committed: the worker can take it
            if not hasattr(self, "_convoy_wake"):
                self._convoy_wake = brokerwake.fifo_path(str(self.connection.client.hostname))
            brokerwake.wake(self._convoy_wake)

        def _get(self, queue: Any, timeout: Any = None) -> Any:
            obj = self._get_or_create(queue)
            if self.session.bind.name == "sqlite":
                self.session.execute(text("BEGIN IMMEDIATE TRANSACTION"))
            try:
                rows = (self.session.query(self.message_cls).with_for_update()
                        .filter(self.message_cls.queue_id == obj.id)
                        .filter(self.message_cls.visible != False)  # noqa: E712 - SQL
                        .order_by(self.message_cls.sent_at).order_by(self.message_cls.id)
                        .limit(SQL_PRIORITY_SCAN).all())
                if not rows:
                    raise Empty()
                best = max(enumerate(rows), key=lambda r: (
                    _message_priority(bytes_to_str(r[1].payload)), -r[0]))[1]
                best.visible = False
                return json.loads(bytes_to_str(best.payload))
            finally:
                self.session.commit()

    return PriorityChannel


def make_celery(settings: Settings, *, include: list[str] | None = None) -> Celery:
    app = Celery("convoy", broker=settings.broker_url, include=include or [])
    transport_options: dict[str, object] = {
        # Longer than any job: Redis would hand an unacked long job to a second worker
        # after the default hour (the lease still makes that a no-op).
        "visibility_timeout": settings.visibility_timeout_seconds,
        "priority_steps": REDIS_PRIORITY_STEPS,
    }
    if settings.broker_url.startswith("sqla+"):
        from kombu.transport import sqlalchemy as kombu_sqla

        from convoy import brokerwake

        # This transport hands every transport option to create_engine, so the polling
        # interval, the channel and the wait between polls can only be set on the class.
        # A message wakes an idle worker on this machine at once (convoy.brokerwake); the
        # poll only catches a lost wake-up.
        kombu_sqla.Transport.polling_interval = settings.broker_polling_interval
        kombu_sqla.Transport.Channel = _prioritised_sqla_channel()
        kombu_sqla.Transport.drain_events = brokerwake.drain_events  # type: ignore[method-assign]
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


def warm_producer(app: Celery) -> None:
    """Pay at start-up what the process's first send_task would: the lookup of the (disabled)
    result backend, which scans every installed package's entry points, a connected producer
    in the pool, and the main queue declared (50 ms of the API's first submission)."""
    app.backend  # noqa: B018 - a lazy property: reading it is the point
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1, timeout=2)
        producer.maybe_declare(app.amqp.queues[app.conf.task_default_queue])


def enqueue(app: Celery, *, kind: str, job_id: str, device: str | None = None,
            devices: int = 1, countdown: float | None = None,
            priority: int = DEFAULT_PRIORITY) -> None:
    """Send the job's message (its id only) to the queue its device (and device count) asks
    for, with the job's priority (0..9, 9 most urgent) in the broker's terms."""
    app.send_task(TASK_FOR_KIND[kind], args=[job_id], countdown=countdown,
                  queue=queue_for(app.conf.task_default_queue, device, devices),
                  priority=broker_priority(str(app.conf.broker_url or ""), priority))


def resend(app: Celery, *, job_id: str, route: Route, countdown: float | None = None) -> None:
    """The job's message once more, as its route (db.dispatch.routes_of) says: its kind, the
    queue of its device and device count, and its priority."""
    enqueue(app, kind=route.kind, job_id=job_id, device=route.device, devices=route.devices,
            countdown=countdown, priority=route.priority)
