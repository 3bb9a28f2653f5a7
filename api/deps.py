"""Every dependency, declared once as an Annotated alias."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import Principal, authenticate
from convoy.artifacts import LocalStore
from convoy.settings import Settings
from db.session import get_sessionmaker


# Dependencies that do no I/O are `async def`: FastAPI runs every sync dependency in the
# thread pool, and those hops were a large share of a status poll's cost (bench/RESULTS.md).
async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    # Making a Session does no I/O; closing one that holds a connection does (rollback, back
    # to the pool), so only that close goes to the thread pool; a handler that closed its
    # session itself (GET /v1/jobs/{id}) saves the hop.
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def get_celery(request: Request) -> Celery:
    return request.app.state.celery


CeleryDep = Annotated[Celery, Depends(get_celery)]


async def get_store(request: Request) -> LocalStore:
    return request.app.state.store


StoreDep = Annotated[LocalStore, Depends(get_store)]


def bearer_secret(request: Request) -> str:
    """The token from `Authorization: Bearer <token>`, or "" for any other header."""
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    return secret.strip() if scheme.lower() == "bearer" else ""


def principal_from(request: Request, session: Session) -> Principal:
    """The caller, or 401. Also called directly by a hot handler that does its reads on one
    thread-pool trip (GET /v1/jobs/{id})."""
    principal = authenticate(session, bearer_secret(request))
    if principal is None:
        raise HTTPException(401, "missing, invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


def get_principal(request: Request, session: SessionDep) -> Principal:
    return principal_from(request, session)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this needs an admin token")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
