"""Embedded mode: one command starts the API and a real Celery worker process on a
serverless broker (kombu's SQLAlchemy transport over SQLite), everything under CONVOY_HOME."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from convoy.settings import Settings


def worker_command(settings: Settings, *, name: str = "worker") -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "worker.app", "worker",
        "--pool", "solo", "--concurrency", "1", "-Q", settings.queue,
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
    """Create home, migrate, make sure an admin token exists; return a token to show."""
    from api.auth import ensure_bootstrap
    from db.migrate import upgrade
    from db.session import session_scope

    settings.home.mkdir(parents=True, exist_ok=True)
    upgrade(settings.database_url)
    with session_scope(settings.database_url) as session:
        minted = ensure_bootstrap(session, settings)
    if settings.bootstrap_token:
        return settings.bootstrap_token
    if minted:
        return minted
    path = Path(settings.token_file) if settings.token_file else None
    return path.read_text().strip() if path and path.exists() else None


def run(settings: Settings) -> int:
    import uvicorn

    from api.app import create_app

    token = prepare(settings)
    worker = subprocess.Popen(worker_command(settings), env=child_env(settings))
    url = f"http://{settings.host}:{settings.port}"
    print(f"\nConvoy (embedded) at {url}   data in {settings.home}", flush=True)
    if token:
        print(f"Token: {token}\n  export CONVOY_URL={url} CONVOY_TOKEN={token}\n", flush=True)
    else:
        print(f"Token: see {settings.token_file} (or set CONVOY_BOOTSTRAP_TOKEN)\n", flush=True)
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level="info")
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)  # warm shutdown: the current step ends
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0
