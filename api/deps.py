"""Every dependency, declared once as an Annotated alias."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import anyio
from celery import Celery
from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy.orm import Session

from api.auth import (
    MISSING,
    Principal,
    TokenCache,
    authenticate,
    hash_token,
    lookup_token,
    plausible,
)
from api.guards import DATABASE_RETRY_AFTER_SECONDS
from convoy.artifacts import ArtifactStore
from convoy.settings import Settings
from db.session import get_read_sessionmaker, get_sessionmaker, pool_capacity


# Dependencies that do no I/O are `async def`: FastAPI runs every sync dependency in the
# thread pool, and those hops were a large share of a status poll's cost (bench/RESULTS.md).
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


log = logging.getLogger(__name__)

# A burst of requests once froze the API. Every thread of the shared pool (the one
# sync handlers, sync dependencies and FastAPI's response validation run on) was waiting for a
# pooled connection, while every connection was held by a request waiting for a thread of that
# same pool (to validate its response, or to close its session). Three rules break the cycle:
# - at most as many requests hold a request session at once as the pool has connections
#   (the gate below, waited on the event loop): a thread never waits for a connection that
#   only a thread-waiting request could give back;
# - closing a session runs on threads of its own (CLOSE_LIMITER), not the shared pool, as
#   FastAPI's contextmanager_in_threadpool does for the same reason;
# - the token check has its own small engine and threads (api.auth.lookup_token).
CLOSE_LIMITER = anyio.CapacityLimiter(64)
AUTH_LIMITER = anyio.CapacityLimiter(4)  # the auth engine's 2 + 2 connections


def _close(session: Session) -> None:
    try:
        session.close()
    except Exception:  # noqa: BLE001 - the connection is invalidated; nothing to answer
        log.warning("closing a database session failed", exc_info=True)


def db_gate(app: FastAPI) -> anyio.Semaphore:
    gate = getattr(app.state, "db_gate", None)
    if gate is None:
        gate = app.state.db_gate = anyio.Semaphore(
            pool_capacity(app.state.settings.database_url))
    return gate


def _busy() -> HTTPException:
    return HTTPException(503, "the database is busy (no connection free): retry shortly",
                         headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})


@asynccontextmanager
async def gated_session(request: Request, settings: Settings, *, read_only: bool = False
                        ) -> AsyncIterator[Session]:
    """A request session under the gate (see above). Making a Session does no I/O; closing
    one that holds a connection does, so only that close goes to a thread; a handler that
    closed its session itself (GET /v1/jobs/{id}) saves the hop. `read_only`: an
    autocommit session (db.session.get_read_sessionmaker), for reads that need no common
    snapshot."""
    gate = db_gate(request.app)
    try:
        with anyio.fail_after(settings.db_pool_timeout_seconds):
            await gate.acquire()
    except TimeoutError:
        raise _busy() from None
    try:
        session = (get_read_sessionmaker if read_only else get_sessionmaker)(
            settings.database_url)()
        try:
            yield session
        finally:
            if session.in_transaction():
                with anyio.CancelScope(shield=True):  # the connection must go back
                    await anyio.to_thread.run_sync(_close, session, limiter=CLOSE_LIMITER)
            else:
                session.close()
    finally:
        gate.release()


async def get_session(request: Request, settings: SettingsDep) -> AsyncIterator[Session]:
    async with gated_session(request, settings) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


CeleryDep = Annotated[Celery, Depends(get_celery)]


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


StoreDep = Annotated[ArtifactStore, Depends(get_store)]


def bearer_secret(request: Request) -> str:
    """The token from `Authorization: Bearer <token>`, or "" for any other header."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    return secret.strip() if scheme.lower() == "bearer" else ""


def unauthorized() -> HTTPException:
    return HTTPException(401, "missing, invalid or revoked token",
                         headers={"WWW-Authenticate": "Bearer"})


def token_cache(app: FastAPI) -> TokenCache:
    """The process's cache of recent token checks (made on first use)."""
    cache = getattr(app.state, "token_cache", None)
    if cache is None:
        settings: Settings = app.state.settings
        cache = app.state.token_cache = TokenCache(
            hit_seconds=settings.auth_hit_cache_seconds,
            miss_seconds=settings.auth_miss_cache_seconds, size=settings.auth_cache_size)
    return cache


def principal_from(request: Request, session: Session) -> Principal:
    """The caller, or 401. Called directly by a hot handler that does its reads on one
    thread-pool trip (GET /v1/jobs/{id}), in that thread."""
    secret = bearer_secret(request)
    cache = token_cache(request.app)
    digest = hash_token(secret) if plausible(secret) else ""
    found = cache.get(digest) if digest else None
    if found is MISSING:
        found = authenticate(session, secret)
        cache.put(digest, found)
    if found is None:
        raise unauthorized()
    return found


async def check_token(request: Request, secret: str) -> Principal | None:
    """The token's principal, or None. A known answer comes from the cache on the event loop;
    otherwise one lookup on its own short session in one thread call, shared by every
    request that asks about the same token meanwhile."""
    if not plausible(secret):
        return None
    cache = token_cache(request.app)
    digest = hash_token(secret)
    found = cache.get(digest)
    if found is not MISSING:
        return found
    pending = cache.inflight.get(digest)
    if pending is not None:  # the same token is being looked up: share that answer
        done, answer = pending
        await done.wait()
        if answer:
            return answer[0]
    leader = digest not in cache.inflight
    done, answer = anyio.Event(), list[Principal | None]()
    if leader:
        cache.inflight[digest] = (done, answer)
    try:
        principal = await anyio.to_thread.run_sync(
            lookup_token, request.app.state.settings.database_url, digest,
            limiter=AUTH_LIMITER)
        cache.put(digest, principal)
        answer.append(principal)
        return principal
    finally:
        if leader:
            del cache.inflight[digest]
            done.set()


async def get_principal(request: Request) -> Principal:
    # async: the cache answers a repeated token on the event loop, and the lookup holds its
    # connection only inside its one thread call (see check_token).
    principal = await check_token(request, bearer_secret(request))
    if principal is None:
        raise unauthorized()
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this needs an admin token")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
