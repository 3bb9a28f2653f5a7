"""Files a tenant sent (datasets, checkpoints, model inputs). Every lookup takes the tenant
and the kind: one tenant's upload is never found by another's request, nor a checkpoint where
a dataset is asked for."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.base import utcnow
from db.tables import Upload


def get(session: Session, *, id: str, tenant: str, kind: str) -> Upload | None:
    return session.scalars(
        select(Upload).where(Upload.id == id, Upload.tenant == tenant, Upload.kind == kind)
    ).one_or_none()


def newest(session: Session, *, tenant: str, kind: str, limit: int = 500) -> list[Upload]:
    """The tenant's uploads of that kind, newest first, at most `limit`."""
    return list(session.scalars(
        select(Upload).where(Upload.tenant == tenant, Upload.kind == kind)
        .order_by(Upload.created_at.desc()).limit(limit)
    ))


def add(session: Session, *, id: str, tenant: str, kind: str, name: str,
        key: str, size: int, sha256: str, meta: dict[str, Any]) -> Upload:
    """Insert the row and commit; the caller deletes the stored file if this raises."""
    row = Upload(id=id, tenant=tenant, kind=kind, name=name, key=key, size=size, sha256=sha256,
                 meta=meta, created_at=utcnow())
    session.add(row)
    session.commit()
    return row


def find_any(session: Session, *, id: str, tenant: str) -> Upload | None:
    """The tenant's upload of any kind (for DELETE /v1/uploads/{id})."""
    return session.scalars(
        select(Upload).where(Upload.id == id, Upload.tenant == tenant)).one_or_none()


def delete(session: Session, *, row: Upload) -> None:
    session.delete(row)
    session.commit()
