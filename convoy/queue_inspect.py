"""What a broker holds, read in its own layout: the knowledge of kombu's Redis message format
lives here, beside the queue configuration (convoy/queue.py), not in the API's reconciler."""

from __future__ import annotations

import base64
import json

from convoy.queue import REDIS_PRIORITY_STEPS, all_queues
from convoy.settings import Settings

# kombu's Redis transport keeps one list per priority step: "q", "q\x06\x161", ...
# (convoy.queue sets the steps to 0..9)
REDIS_PRIORITY_SEP = "\x06\x16"


def job_id_of(raw: bytes | str) -> str | None:
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
        keys = [key for queue in all_queues(settings.queue,
                                            max_devices=settings.max_devices_per_job)
                for key in redis_queue_keys(queue)]
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
            held.update(i for i in map(job_id_of, chunk) if i)
        return held
    finally:
        client.close()
