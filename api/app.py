"""The FastAPI application: routers, limits on request bodies, error shapes, and the
start-up work (bootstrap token, reconciler)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import ensure_bootstrap
from api.guards import (
    RejectNul,
    data_error,
    database_error,
    database_unavailable,
    http_error,
)
from api.jobwait import JobWaits
from api.metrics import HttpMetrics
from api.openapi import AllowOptions, install
from api.reconciler import Reconciler
from api.routes import (
    dashboard,
    datasets,
    evaluate,
    events,
    feature_maps,
    health,
    invariance,
    jobs,
    lifecycle,
    models,
    ops,
    sweeps,
    tokens,
    uploads,
    webhooks,
)
from api.sweeper import SweepDriver
from api.textguard import RejectUnencodableJSON
from api.webhooks import Sender
from convoy.artifacts import StoreUnavailable, get_store
from convoy.queue import make_celery
from convoy.settings import Settings, get_settings
from db.session import configure_pools, session_scope

log = logging.getLogger(__name__)

UPLOAD_PATHS = ("/v1/datasets", "/v1/checkpoints", "/v1/inputs")


class RedactTokens(logging.Filter):
    """`?token=` (EventSource sends no headers) must not reach the access log: the secret
    would sit in plain text in every log file and log shipper. Keys are compared decoded, as
    Starlette reads them (`?%74oken=` is `token` too)."""

    @staticmethod
    def redact(path: str) -> str:
        head, sep, query = path.partition("?")
        if not sep:
            return path
        params = []
        for param in query.split("&"):
            key, eq, _ = param.partition("=")
            params.append(f"{key}{eq or '='}[redacted]" if RedactTokens.secret_key(key)
                          else param)
        return head + "?" + "&".join(params)

    @staticmethod
    def secret_key(key: str) -> bool:
        """Whether a query key names a secret: its decoded name, with control characters
        (NUL included) and spaces dropped, starts with `token` in any case. `?token%00=`,
        `?Token_x=`, `?%74oken=` and `?tokens=` are all redacted."""
        name = "".join(c for c in unquote_plus(key, errors="replace")
                       if c.isprintable() and not c.isspace())
        return name.lower().startswith("token")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "?" in a
                                                  for a in record.args):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def redact_access_log() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())


class BodyLimit:
    """413 before a byte past the limit is read; 415 for a body of the wrong type."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        is_upload = path.rstrip("/") in UPLOAD_PATHS
        limit = self.settings.max_upload_bytes + 64 * 1024 if is_upload \
            else self.settings.max_request_bytes
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _reply(send, 413, f"request body larger than {limit} bytes")
        if is_upload and ctype != "multipart/form-data":
            return await _reply(send, 415, "uploads must be multipart/form-data with a file field")
        if not is_upload and (length not in (None, b"0")) and ctype != "application/json":
            return await _reply(send, 415, f"content type {ctype or 'none'!r}: send "
                                           "application/json")
        received, too_large, started = 0, False, False

        async def limited() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _TooLarge()
            return message

        async def guarded(message: Message) -> None:
            # FastAPI turns any error while reading a body into its own 400; once the cap
            # was hit, that reply is dropped and the 413 below goes out instead.
            nonlocal started
            if too_large and not started:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with suppress(_TooLarge):
            await self.app(scope, limited, guarded)
        if too_large and not started:
            await _reply(send, 413, f"request body larger than {limit} bytes")


class _TooLarge(Exception):
    pass


async def _reply(send: Send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field; the offending input is not echoed back (it may be huge)."""
    errors: list[dict[str, Any]] = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()[:20]
    ]
    return JSONResponse({"detail": errors}, status_code=422)


async def store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
    """507 naming the store and the reason (full, read-only...), not a bare 500."""
    log.error("%s", exc)
    return JSONResponse({"detail": exc.public()}, status_code=507,
                        headers={"Retry-After": "60"})


E = TypeVar("E", bound=Exception)


def on_error(app: FastAPI, exc_type: type[E],
             handler: Callable[[Request, E], Awaitable[Response]]) -> None:
    """Register `handler` for `exc_type`: Starlette types every handler as taking any
    Exception; this pairs each with the type it is called for."""
    app.add_exception_handler(exc_type, handler)  # type: ignore[arg-type]  # see above


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_pools(timeout_seconds=settings.db_pool_timeout_seconds)
    redact_access_log()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with session_scope(settings.database_url) as session:
            ensure_bootstrap(session, settings)
        reconciler = Reconciler(settings, app.state.celery)
        reconciler.start()
        sender = Sender(settings)  # webhook deliveries from the outbox
        sender.start()
        sweep_driver = SweepDriver(settings, app.state.celery)  # issue 20
        sweep_driver.start()
        await health.warm_up(app.state)
        yield
        app.state.job_waits.stop()
        sweep_driver.stop()
        sender.stop()
        reconciler.stop()

    # redirect_slashes=False: one spelling per resource. The redirect turned `name/` and
    # `%2F` probes into 307s to other routes, with a Location built from the Host header.
    app = FastAPI(title="Convoy", version="0.1.0", lifespan=lifespan, redirect_slashes=False,
                  description="Train CNNs and extract their feature maps as jobs.")
    app.state.settings = settings
    app.state.celery = make_celery(settings)
    app.state.store = get_store(settings)
    app.state.job_waits = JobWaits(settings)  # wakes requests waiting on a job
    on_error(app, RequestValidationError, validation_error)
    on_error(app, HTTPException, http_error)
    on_error(app, DataError, data_error)
    on_error(app, StoreUnavailable, store_unavailable)
    # no connection free, or the database away: 503 + Retry-After
    for exc_type in (PoolTimeout, OperationalError, InterfaceError):
        on_error(app, exc_type, database_unavailable)
    on_error(app, DBAPIError, database_error)
    for module in (health, jobs, models, datasets, tokens):
        app.include_router(module.router)
    for module in (events, dashboard):  # the live stream and the web UI
        app.include_router(module.router)
    for module in (feature_maps, uploads):  # feature-map jobs and their uploads
        app.include_router(module.router)
    app.include_router(invariance.router)
    app.include_router(lifecycle.router)  # DELETE jobs and uploads, usage
    app.include_router(evaluate.router)  # evaluate jobs' predictions, export jobs' files
    for module in (ops, webhooks):  # for operators: /metrics, workers, webhooks
        app.include_router(module.router)
    app.include_router(sweeps.router)  # hyperparameter sweeps (issue 20)
    dashboard.mount_static(app)
    install(app)  # the OpenAPI document with every status, the token and the error body
    app.add_middleware(AllowOptions, api=app)
    app.add_middleware(RejectUnencodableJSON)  # inside BodyLimit: reads capped bodies only
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(RejectNul)  # runs before the body is read
    app.add_middleware(HttpMetrics, api=app)  # outermost: every answer is timed
    return app


def app_factory() -> FastAPI:
    """For `uvicorn --factory api.app:app_factory`."""
    return create_app()
