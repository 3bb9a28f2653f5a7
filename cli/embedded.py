"""Embedded mode: one command starts the API and a real Celery worker process on a
serverless broker (kombu's SQLAlchemy transport over SQLite), everything under CONVOY_HOME."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from convoy.queue import gpu_queue
from convoy.settings import Settings

if TYPE_CHECKING:
    import uvicorn

# A warm shutdown hands a training job back to the queue between two steps (worker/app.py);
# anything that keeps the worker busy longer is not worth the wait on Ctrl-C: it is killed,
# its lease expires, and the next start resumes the job from its last checkpoint.
WORKER_STOP_GRACE_SECONDS = 5.0
PR_SET_PDEATHSIG = 1


def worker_command(settings: Settings, *, name: str = "worker", gpu: bool = True
                   ) -> list[str]:
    """A solo Celery worker on the main queue, and on the GPU queue when `gpu`."""
    queues = [settings.queue, *([gpu_queue(settings.queue)] if gpu else [])]
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--pool", "solo", "--concurrency", "1", "-Q", ",".join(queues),
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-n", f"{name}@%h", "--loglevel", "INFO",
    ]


def child_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "CONVOY_HOME": str(settings.home),
        "CONVOY_DATABASE_URL": settings.database_url,
        "CONVOY_BROKER_URL": settings.broker_url,
        "CONVOY_ARTIFACT_ROOT": str(settings.artifact_root),
    })
    return env


def prepare(settings: Settings) -> str | None:
    """Create home, migrate, make sure an admin token exists; return a newly minted one, the
    only time a secret is shown (later starts say where it is saved)."""
    from api.auth import ensure_bootstrap
    from db.migrate import upgrade
    from db.session import session_scope

    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        return ensure_bootstrap(session, settings)


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the worker child before exec: if `convoy run` is killed outright (SIGKILL, a
    closed terminal), the kernel sends the worker SIGTERM instead of leaving it orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def start_worker(settings: Settings) -> subprocess.Popen:
    parent = os.getpid()
    # the only worker here: it also takes jobs asking for CUDA (and fails them clearly
    # without a GPU rather than leave them queued for a GPU worker that never comes)
    cmd = worker_command(settings, gpu=settings.worker_gpu_queue is not False)
    return subprocess.Popen(cmd, env=child_env(settings),
                            preexec_fn=lambda: _die_with_parent(parent))


def stop_worker(worker: subprocess.Popen, grace: float = WORKER_STOP_GRACE_SECONDS) -> None:
    """Warm shutdown first; kill it when a job keeps it busy past the grace period or when
    the user presses Ctrl-C again."""
    if worker.poll() is not None:
        return
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=grace)
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        print("worker still busy: stopping it now; a running job resumes from its last "
              "checkpoint on the next start", file=sys.stderr, flush=True)
        worker.kill()
        worker.wait()


def _watch(worker: subprocess.Popen[bytes], server: uvicorn.Server,
           stopping: threading.Event) -> None:
    """Stop the API when the worker dies on its own: jobs would queue up unseen."""
    worker.wait()
    if not stopping.is_set():
        print(f"worker exited with {worker.returncode}: stopping the API", file=sys.stderr,
              flush=True)
        server.should_exit = True


def run(settings: Settings) -> int:
    import uvicorn

    from api.app import create_app
    from api.server import raise_nofile_limit, serve_options

    token = prepare(settings)
    raise_nofile_limit()  # and header/keep-alive timeouts, a connection cap
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host,
                                           port=settings.port, log_level="info",
                                           **serve_options(settings)))
    worker = start_worker(settings)
    stopping = threading.Event()
    threading.Thread(target=_watch, args=(worker, server, stopping), daemon=True,
                     name="worker-watch").start()
    url = f"http://{settings.host}:{settings.port}"
    print(f"\nConvoy (embedded) at {url}   data in {settings.home}", flush=True)
    if token:
        print(f"Token: {token}\n  export CONVOY_URL={url} CONVOY_TOKEN={token}\n", flush=True)
    elif settings.bootstrap_token:
        print(f"Token: the one in CONVOY_BOOTSTRAP_TOKEN\n  export CONVOY_URL={url} "
              "CONVOY_TOKEN=\"$CONVOY_BOOTSTRAP_TOKEN\"\n", flush=True)
    elif settings.token_file and settings.token_file.is_file():
        print(f"Token: saved in {settings.token_file} on the first start\n  export "
              f"CONVOY_URL={url} CONVOY_TOKEN=$(cat {settings.token_file})\n", flush=True)
    else:
        print(f"Token: shown on the first start only ({settings.token_file} is gone); to get "
              "a new admin token, restart with CONVOY_BOOTSTRAP_TOKEN set to a secret of "
              "your choice\n", flush=True)
    # uvicorn turns Ctrl-C into a graceful shutdown, then raises the signal again once it
    # has finished: that KeyboardInterrupt is the normal way out here.
    with contextlib.suppress(KeyboardInterrupt):
        try:
            server.run()
        finally:
            stopping.set()
            stop_worker(worker)
    if not server.started:
        return 1  # e.g. the port is taken
    return 0 if worker.returncode in (0, -signal.SIGTERM, -signal.SIGKILL) else 1
