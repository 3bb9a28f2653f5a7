"""Private infrastructure a fault test may break: its own Redis and its own PostgreSQL
cluster (own port, own data folder), plus the stacks and jobs the reliability tests share."""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from glob import glob
from pathlib import Path
from typing import Any

import psycopg
import redis

from tests.services import (
    REDIS,
    Stack,
    create_pg_database,
    drop_pg_database,
    free_port,
    stack_env,
)

PG_BIN = Path(sorted(glob("/usr/lib/postgresql/*/bin"))[-1]) if glob(
    "/usr/lib/postgresql/*/bin") else Path("/usr/bin")


class PrivateRedis:
    """redis-server without persistence: a kill loses every message it held."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.home / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - owned by proc
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.home)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError(f"redis on port {self.port} did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


class PrivatePostgres:
    """A PostgreSQL cluster of our own. initdb and pg_ctl refuse root, so they run as the
    `postgres` user, in a folder that user owns."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="convoy-pg-"))
        shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()

    def _as_postgres(self, *cmd: str | Path) -> None:
        line = shlex.join(str(c) for c in cmd)
        subprocess.run(["su", "postgres", "-c", line], check=True, capture_output=True,
                       timeout=120)

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def init(self) -> None:
        self._as_postgres(PG_BIN / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres",
                          "--no-sync")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-l", self.dir / "pg.log",
                          "-o", opts, "-w", "start")

    def stop(self) -> None:
        self._as_postgres(PG_BIN / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def create_database(self) -> str:
        name = f"convoy_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_stack(home: Path, *, database_url: str, broker_url: str,
               extra_env: dict[str, str] | None = None, **settings: Any) -> Stack:
    """A stack whose `settings` are CONVOY_ variables (lease_seconds=3: CONVOY_LEASE_SECONDS),
    and with `extra_env` (variables as they are named: an S3 store's AWS_...)."""
    extra = {**(extra_env or {}), **{f"CONVOY_{k.upper()}": str(v) for k, v in settings.items()}}
    env = stack_env(home, database_url=database_url, broker_url=broker_url,
                    queue=f"convoy-rel-{uuid.uuid4().hex[:8]}", **extra)
    return Stack(env=env, home=home)


def embedded_stack(home: Path, **settings: Any) -> Stack:
    """make_stack on the embedded parts: SQLite and kombu's SQLAlchemy broker over SQLite,
    both files in `home`."""
    return make_stack(home, database_url=f"sqlite:///{home / 'convoy.db'}",
                      broker_url=f"sqla+sqlite:///{home / 'broker.db'}", **settings)


def slow_job(epochs: int = 4) -> dict[str, Any]:
    """Epochs of about a second or two on one CPU thread: 'the middle of epoch 2' is reachable."""
    return {
        "kind": "train", "name": "slow",
        "model": {"input_shape": [3, 16, 16], "num_classes": 4, "layers": [
            {"type": "conv2d", "out_channels": 48, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": 4}]},
        "dataset": {"name": "synthetic", "samples": 8192, "size": 16, "channels": 3,
                    "num_classes": 4},
        "train": {"epochs": epochs, "batch_size": 32, "optimizer": "sgd", "lr": 0.02,
                  "momentum": 0.9, "seed": 0},
        "device": "cpu",
    }


def tiny_job(seed: int = 0) -> dict[str, Any]:
    """As little work as a real train job can be: one epoch of 16 8x8 images."""
    return {
        "kind": "train", "name": f"tiny-{seed}",
        "model": {"input_shape": [1, 8, 8], "num_classes": 2, "layers": [
            {"type": "conv2d", "out_channels": 2, "kernel_size": 3, "padding": 1},
            {"type": "flatten"},
            {"type": "linear", "out_features": 2}]},
        "dataset": {"name": "synthetic", "samples": 16, "size": 8, "channels": 1,
                    "num_classes": 2},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.01,
                  "seed": seed},
        "device": "cpu",
    }


def sync_url(database_url: str) -> str:
    return database_url.replace("postgresql+psycopg://", "postgresql://")


def attempts(database_url: str, job_id: str) -> list[tuple[Any, ...]]:
    """(attempt, worker_id, started_at, ended_at, outcome) rows of a job's lease history."""
    with psycopg.connect(sync_url(database_url)) as conn:
        return conn.execute(
            "SELECT attempt, worker_id, started_at, ended_at, outcome FROM job_attempts "
            "WHERE job_id = %s ORDER BY attempt", (job_id,)).fetchall()


def wait_for(predicate: Any, *, timeout: float = 60, every: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(what or repr(predicate))


def metric_epochs(client: Any, job_id: str) -> dict[str, list[int]]:
    series = client.get(f"/v1/jobs/{job_id}/metrics").json()["series"]
    return {name: [p["epoch"] for p in points] for name, points in series.items()}


def stop_fast(stack: Stack) -> None:
    """Teardown without graceful shutdowns (not under test here; they cost seconds each)."""
    for proc in [*stack.workers, *([stack.api] if stack.api else [])]:
        Stack.kill(proc, signal.SIGKILL)
    stack.stop()


@contextlib.contextmanager
def api_without_workers(home: Path, extra_env: dict[str, str] | None = None,
                        **settings: Any) -> Iterator[Stack]:
    """An API on a database of its own (PostgreSQL) and Redis, no worker yet: for tests that
    start their workers themselves. Torn down without graceful shutdowns."""
    url = create_pg_database()
    stack = make_stack(home, database_url=url, broker_url=f"{REDIS}/0", extra_env=extra_env,
                       **settings)
    try:
        stack.start_api()
        yield stack
    finally:
        stop_fast(stack)
        drop_pg_database(url)
