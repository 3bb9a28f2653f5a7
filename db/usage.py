"""A tenant's storage: the bytes its job artifacts and its uploads hold in the store, and
how many of each (what GET /v1/usage shows and the storage quota counts)."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.tables import Artifact, Job, Upload


@dataclass(frozen=True)
class Storage:
    artifact_bytes: int
    upload_bytes: int
    artifacts: int
    uploads: int

    @property
    def bytes(self) -> int:
        return self.artifact_bytes + self.upload_bytes


@dataclass(frozen=True)
class Usage:
    bytes: int
    artifact_bytes: int
    upload_bytes: int
    jobs: int
    artifacts: int
    uploads: int


def storage_of(session: Session, *, tenant: str) -> Storage:
    """What the storage quota checks on each submission and upload: index-only sums over the
    tenant's artifact and upload rows (not the count of all its jobs, which of_tenant adds)."""
    art_count, art_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Artifact.size), 0))
        .where(Artifact.tenant == tenant)).one()
    up_count, up_bytes = session.execute(
        select(func.count(), func.coalesce(func.sum(Upload.size), 0))
        .where(Upload.tenant == tenant)).one()
    return Storage(artifact_bytes=int(art_bytes), upload_bytes=int(up_bytes),
                   artifacts=int(art_count), uploads=int(up_count))


def of_tenant(session: Session, *, tenant: str) -> Usage:
    stored = storage_of(session, tenant=tenant)
    jobs = session.scalar(select(func.count()).select_from(Job).where(Job.tenant == tenant))
    return Usage(bytes=stored.bytes, artifact_bytes=stored.artifact_bytes,
                 upload_bytes=stored.upload_bytes, jobs=int(jobs or 0),
                 artifacts=stored.artifacts, uploads=stored.uploads)
