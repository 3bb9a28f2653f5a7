"""Every dependency, declared once as an Annotated alias."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from api.auth import Principal, authenticate
from convoy.artifacts import LocalStore
from convoy.settings import Settings
from db.session import get_sessionmaker


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def get_session(settings: SettingsDep) -> Iterator[Session]:
    session = get_sessionmaker(settings.database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


def get_celery(request: Request) -> Celery:
    return request.app.state.celery


CeleryDep = Annotated[Celery, Depends(get_celery)]


def get_store(request: Request) -> LocalStore:
    return request.app.state.store


StoreDep = Annotated[LocalStore, Depends(get_store)]


def get_principal(request: Request, session: SessionDep) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    principal = authenticate(session, secret.strip()) if scheme.lower() == "bearer" else None
    if principal is None:
        raise HTTPException(401, "missing, invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> Principal:
    if not principal.is_admin:
        raise HTTPException(403, "this needs an admin token")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
