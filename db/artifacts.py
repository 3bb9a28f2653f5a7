"""Files a job produced (checkpoints, feature maps, PNGs): the lease holder's writes and the
reads of a job's rows. Reads that take a tenant filter by it; the others serve a caller that
has already checked the job is the tenant's."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.leases import holds_lease
from db.tables import Artifact


def upsert(session: Session, *, artifact: Artifact) -> None:
    """Add the row, or overwrite the job's row of that kind and name (a resumed attempt
    rewrites an epoch); committed with the caller's transaction."""
    existing = session.scalars(
        select(Artifact).where(
            Artifact.job_id == artifact.job_id,
            Artifact.kind == artifact.kind,
            Artifact.name == artifact.name,
        )
    ).one_or_none()
    if existing is None:
        session.add(artifact)
    else:
        existing.key, existing.size, existing.sha256 = artifact.key, artifact.size, artifact.sha256
        existing.meta = artifact.meta


def add(session: Session, *, job_id: str, worker_id: str, artifacts: Iterable[Artifact]) -> bool:
    """Upsert the rows and commit, only while the worker holds the job's lease (else False)."""
    if not holds_lease(session, job_id=job_id, worker_id=worker_id):
        return False
    # One read of the job's rows, not a query (and an autoflush) per artifact: a feature-map
    # job adds thousands of rows (a PNG per layer and input).
    existing = {(a.kind, a.name): a
                for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))}
    for artifact in artifacts:
        old = existing.get((artifact.kind, artifact.name))
        if old is None:
            session.add(artifact)
            existing[(artifact.kind, artifact.name)] = artifact
        else:
            old.key, old.size, old.sha256 = artifact.key, artifact.size, artifact.sha256
            old.meta = artifact.meta
    session.commit()
    return True


def checkpoints(session: Session, *, job_id: str) -> list[Artifact]:
    """The job's model checkpoint rows by name (oldest epoch first)."""
    return list(session.scalars(
        select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == "checkpoint")
        .order_by(Artifact.name)
    ))


def checkpoint_names(session: Session, *, job_id: str, tenant: str) -> list[str]:
    return list(session.scalars(
        select(Artifact.name).where(Artifact.job_id == job_id, Artifact.tenant == tenant,
                                    Artifact.kind == "checkpoint").order_by(Artifact.name)))


def resume_candidates(session: Session, *, job_id: str) -> list[Artifact]:
    """The job's checkpoint and optimizer rows, newest first: what a resumed attempt picks
    its starting epoch from."""
    return list(session.scalars(
        select(Artifact)
        .where(Artifact.job_id == job_id, Artifact.kind.in_(("checkpoint", "optimizer")))
        .order_by(Artifact.name.desc())
    ))


def of_kind(session: Session, *, job_id: str, tenant: str, kind: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(
        Artifact.job_id == job_id, Artifact.tenant == tenant, Artifact.kind == kind)))


def find(session: Session, *, job_id: str, tenant: str, kind: str, name: str
         ) -> Artifact | None:
    return session.scalars(select(Artifact).where(
        Artifact.job_id == job_id, Artifact.tenant == tenant, Artifact.kind == kind,
        Artifact.name == name)).first()


def find_by_prefix(session: Session, *, job_id: str, tenant: str, kind: str, prefix: str
                   ) -> Artifact | None:
    """The first of the job's rows of that kind whose name starts with `prefix` and has no
    `/` after it (a top-level layer, not one inside a residual block)."""
    return session.scalars(select(Artifact).where(
        Artifact.job_id == job_id, Artifact.tenant == tenant, Artifact.kind == kind,
        Artifact.name.startswith(prefix, autoescape=True),
        ~Artifact.name.contains("/", autoescape=True))).first()

def delete_rows(session: Session, rows: Iterable[Artifact]) -> list[str]:
    """Delete the rows (with the caller's transaction) and return their store keys, which
    the caller removes only after the commit: a listed file is never missing."""
    keys: list[str] = []
    for row in rows:
        keys.append(row.key)
        session.delete(row)
    return keys


def of_job(session: Session, *, job_id: str) -> list[Artifact]:
    """Every row of the job (the caller has checked it is the tenant's)."""
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
