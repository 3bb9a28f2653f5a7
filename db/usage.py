"""A tenant's storage: the bytes its job artifacts and its uploads hold in the store, and
how many of each (what GET /v1/usage shows and the storage quota counts)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.tables import Artifact, Job, Upload


@dataclass(frozen=True)
class Usage:
    bytes: int
    artifact_bytes: int
    upload_bytes: int
    jobs: int
    artifacts: int
    uploads: int


def of_tenant(session: Session, *, tenant: str) -> Usage:
    art_count, art_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Artifact.size), 0))
        .where(Artifact.tenant == tenant)).one()
    up_count, up_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Upload.size), 0))
        .where(Upload.tenant == tenant)).one()
    jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant))
    return Usage(bytes=int(art_bytes) + int(up_bytes), artifact_bytes=int(art_bytes),
                 upload_bytes=int(up_bytes), jobs=int(jobs or 0), artifacts=int(art_count),
                 uploads=int(up_count))
