"""Liveness and readiness (database, broker, artifact store)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import anyio
from celery import Celery
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import State

from api.schemas import ReadyOut
from convoy.artifacts import ArtifactStore, StoreUnavailable
from convoy.queue import warm_producer
from db.session import ping

router = APIRouter(tags=["health"])

# /readyz must answer promptly while the API is under load: its checks run
# on threads of their own (never queued behind the shared thread pool) and the database check
# uses an engine of its own (never queued behind the request pool), each bounded in time.
CHECK_LIMITER = anyio.CapacityLimiter(4)
CHECK_SECONDS = 2.0


def _check_database(url: str) -> None:
    ping(url, "readyz")


def _check_broker(celery: Celery) -> None:
    with celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _check_store(store: ArtifactStore) -> None:
    store.check()  # a probe object written and deleted: reachable and writable


async def _run_check(fn: Callable[..., object], *args: object, what: str = "") -> str:
    try:
        with anyio.fail_after(CHECK_SECONDS):
            await anyio.to_thread.run_sync(fn, *args, limiter=CHECK_LIMITER,
                                           abandon_on_cancel=True)
        return "ok"
    except TimeoutError:
        return f"error: {what + ' ' if what else ''}timed out"
    except StoreUnavailable as exc:
        return f"error: {exc.public()}"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"error: {type(exc).__name__}"


async def warm_up(state: State) -> None:
    """Run the readiness checks once at start-up, so the first /readyz finds its engine
    connected and the broker's transport loaded (a cold first check cost up to a second),
    and ready the producer the first POST /v1/jobs sends with."""
    await _run_check(_check_database, state.settings.database_url)
    await _run_check(_check_broker, state.celery)
    await _run_check(warm_producer, state.celery)  # the first submission's enqueue
    await _run_check(_check_store, state.store)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=ReadyOut, responses={
    503: {"model": ReadyOut, "description": "a check failed: not ready",
          "headers": {"Retry-After": {"schema": {"type": "integer"}}}}})
async def readyz(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    checks: dict[str, str] = {}

    async def check(name: str, fn: Callable[..., object], *args: object, what: str = "") -> None:
        checks[name] = await _run_check(fn, *args, what=what)

    async with anyio.create_task_group() as tg:
        tg.start_soon(check, "database", _check_database, settings.database_url)
        tg.start_soon(check, "broker", _check_broker, request.app.state.celery)
        store = request.app.state.store
        tg.start_soon(partial(check, "artifacts", _check_store, store,
                              what=f"the artifact store {store.name}"
                              if store.name.startswith("s3://") else "the artifact store"))
    checks = {k: checks[k] for k in ("database", "broker", "artifacts")}
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": "5"})
