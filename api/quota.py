"""The per-tenant storage quota (max_storage_bytes_per_tenant): a submission or an upload
that would pass it is a 413 that says what the tenant holds."""

from __future__ import annotations

from fastapi import HTTPException
from sqlalchemy.orm import Session

from convoy.settings import Settings
from db import usage


def check_storage(session: Session, settings: Settings, *, tenant: str, adding: int = 0,
                  what: str) -> None:
    limit = settings.max_storage_bytes_per_tenant
    if limit is None:
        return
    used = usage.storage_of(session, tenant=tenant)
    if used.bytes + adding > limit or (adding == 0 and used.bytes >= limit):
        raise HTTPException(413, f"{what}: the tenant's storage is full: it holds {used.bytes} "
                                 f"bytes ({used.artifacts} job files, {used.uploads} uploads)"
                                 f"{f' and this adds {adding}' if adding else ''}, the limit "
                                 f"max_storage_bytes_per_tenant is {limit}; delete jobs or "
                                 "uploads (DELETE /v1/jobs/{id}, /v1/uploads/{id})")
