"""Start the service's real processes for a benchmark, as tests/services.py Stack does:
`embedded` (SQLite + kombu's SQLAlchemy broker, no servers) or `pg` (PostgreSQL + Redis)."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.services import REDIS, Stack, create_pg_database, drop_pg_database, stack_env


@contextmanager
def service(mode: str, *, workers: int = 1, **extra_env: str) -> Iterator[Stack]:
    """An API process and `workers` worker processes; everything removed afterwards."""
    with tempfile.TemporaryDirectory(prefix=f"convoy-bench-{mode}-") as tmp:
        home = Path(tmp)
        queue = f"convoy-bench-{uuid.uuid4().hex[:8]}"
        pg_url = None
        if mode == "pg":
            pg_url = create_pg_database()
            env = stack_env(home, database_url=pg_url, broker_url=f"{REDIS}/0", queue=queue,
                            **extra_env)
        else:
            env = stack_env(home, database_url=f"sqlite:///{home / 'convoy.db'}",
                            broker_url=f"sqla+sqlite:///{home / 'broker.db'}", queue=queue,
                            **extra_env)
        # the service's default checkpoint cadence, not the tests' every-epoch one
        if "CONVOY_CHECKPOINT_MIN_SECONDS" not in extra_env:
            env.pop("CONVOY_CHECKPOINT_MIN_SECONDS", None)
        if "CONVOY_EPOCH_RECORD_SECONDS" not in extra_env:  # and its epoch records'
            env.pop("CONVOY_EPOCH_RECORD_SECONDS", None)
        stack = Stack(env=env, home=home)
        try:
            stack.start_api()
            for _ in range(workers):
                stack.start_worker()
            yield stack
        finally:
            stack.stop()
            if mode == "pg":
                _drop_queue(queue)
                assert pg_url is not None
                drop_pg_database(pg_url)


def _drop_queue(queue: str) -> None:
    """Messages a benchmark left unconsumed (submissions with no worker) must not linger."""
    import redis

    r = redis.Redis.from_url(f"{REDIS}/0")
    r.delete(queue, *[k for k in r.keys(f"{queue}*")])
    r.close()
