"""Real processes for tests: a PostgreSQL database, a Redis db, the API (uvicorn) and Celery
workers, each started as the deployment starts them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("CONVOY_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS = os.environ.get("CONVOY_TEST_REDIS", "redis://127.0.0.1:6379")
TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_pg_database() -> str:
    name = f"convoy_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def wait_http(url: str, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(url)


@dataclass
class Stack:
    """An API process and worker processes sharing one database, broker and artifact root."""

    env: dict[str, str]
    home: Path
    port: int = 0
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Any] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, cmd: list[str], name: str, extra_env: dict[str, str] | None = None
               ) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.logs.append(log)
        return subprocess.Popen(cmd, cwd=ROOT, env={**self.env, **(extra_env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_api(self, cmd: list[str] | None = None) -> None:
        self.port = self.port or free_port()
        cmd = cmd or [sys.executable, "-m", "cli.main", "api", "--migrate",
                      "--host", "127.0.0.1", "--port", str(self.port)]
        self.api = self._spawn(cmd, "api")
        wait_http(self.url + "/healthz", proc=self.api)

    def start_worker(self, name: str | None = None, cmd: list[str] | None = None
                     ) -> subprocess.Popen:
        name = name or f"w{len(self.workers)}"
        cmd = cmd or [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool",
                      "solo", "-Q", self.env["CONVOY_QUEUE"], "--without-gossip",
                      "--without-mingle", "--without-heartbeat", "-n", f"{name}@%h",
                      "--loglevel", "INFO"]
        proc = self._spawn(cmd, name, {"CONVOY_WORKER_ID": name})
        self.workers.append(proc)
        self.wait_worker_ready(name)
        return proc

    def wait_worker_ready(self, name: str, timeout: float = 60) -> None:
        log = self.home / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if log.exists() and b" ready." in log.read_bytes():
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker {name} not ready: {log.read_text()[-2000:]}")

    def client(self, token: str = TOKEN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"},
                            timeout=30)

    def log_text(self, name: str) -> str:
        path = self.home / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @staticmethod
    def kill(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self) -> None:
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            self.kill(proc)
        for log in self.logs:
            log.close()


def stack_env(home: Path, *, database_url: str, broker_url: str, queue: str,
              **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVOY_")}
    env.update({
        "CONVOY_HOME": str(home),
        "CONVOY_DATABASE_URL": database_url,
        "CONVOY_BROKER_URL": broker_url,
        "CONVOY_QUEUE": queue,
        "CONVOY_BOOTSTRAP_TOKEN": TOKEN,
        "CONVOY_HEARTBEAT_SECONDS": "1",
        # A checkpoint every epoch, as the tests that look at a job's checkpoints expect; the
        # default cadence (at most one per CONVOY_CHECKPOINT_MIN_SECONDS) is bench_e2e's, and
        # tests/reliability/test_worker_faults.py's cadence tests give theirs per job.
        "CONVOY_CHECKPOINT_MIN_SECONDS": "0",
        # Each epoch recorded at its end, as the tests that watch a running job's epochs
        # expect; short epochs recorded together (the default) are bench_e2e's, and
        # tests/worker/test_train_job.py runs both ways.
        "CONVOY_EPOCH_RECORD_SECONDS": "0",
        "PYTHONUNBUFFERED": "1",
        **extra,
    })
    return env


def wait_job(client: httpx.Client, job_id: str, *, states: tuple[str, ...] = (
        "succeeded", "failed", "canceled"), timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s")


def run_ok(client: httpx.Client, body: dict[str, Any], *, timeout: float = 120
           ) -> dict[str, Any]:
    """Submit `body`, wait for the job and check that it succeeded: the finished job."""
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    done = wait_job(client, r.json()["id"], timeout=timeout)
    assert done["state"] == "succeeded", done["error"]
    return done


@contextmanager
def api_alone(home: Path, *, database_url: str, queue_prefix: str,
              broker_url: str | None = None, **extra: str) -> Iterator[Stack]:
    """The API alone (no worker) on `database_url` and a queue of its own (named
    `queue_prefix-<random>`); the broker is Redis unless given. Stopped on the way out."""
    env = stack_env(home, database_url=database_url, broker_url=broker_url or f"{REDIS}/0",
                    queue=f"{queue_prefix}-{uuid.uuid4().hex[:8]}", **extra)
    stack = Stack(env=env, home=home)
    try:
        stack.start_api()
        yield stack
    finally:
        stack.stop()


@contextmanager
def api_on_sqlite(home: Path, *, broker_url: str | None = None, queue_prefix: str = "convoy-sqlite",
               **extra: str) -> Iterator[Stack]:
    """The API alone (no worker) on a SQLite database in `home`, as the embedded mode keeps
    it; the broker is Redis unless given."""
    with api_alone(home, database_url=f"sqlite:///{home / 'convoy.db'}",
                   queue_prefix=queue_prefix, broker_url=broker_url, **extra) as stack:
        yield stack


def status_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status field in KiB (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


class MemoryWatch:
    """A process's resident memory while in the block: VmRSS sampled every `every_s` on a
    thread (its peak), VmHWM read on entry and on exit; `grew` and `hwm_grew` in bytes."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s = pid, every_s
        self.before_rss = self.before_hwm = self.peak = self.after_hwm = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> MemoryWatch:
        self.before_rss = status_kib(self.pid, "VmRSS")
        self.before_hwm = status_kib(self.pid, "VmHWM")
        self.peak = self.before_rss
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(self.every_s):
            self.peak = max(self.peak, status_kib(self.pid, "VmRSS"))

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.after_hwm = status_kib(self.pid, "VmHWM")

    @property
    def grew(self) -> int:
        return (self.peak - self.before_rss) * 1024

    @property
    def hwm_grew(self) -> int:
        return (self.after_hwm - self.before_hwm) * 1024

    def __str__(self) -> str:
        return (f"RSS before {self.before_rss} KiB, peak during {self.peak} KiB "
                f"(+{self.grew >> 20} MiB), VmHWM +{self.hwm_grew >> 20} MiB")
