"""Files a job produced (checkpoints, feature maps, PNGs): the lease holder's writes and the
reads of a job's rows. Reads that take a tenant filter by it; the others serve a caller that
has already checked the job is the tenant's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.base import upsert_statement, utcnow
from db.leases import holds_lease
from db.tables import Artifact


def put_rows(session: Session, rows: Iterable[Artifact]) -> None:
    """Add the rows, or overwrite the job's row of that kind and name (a resumed attempt
    rewrites an epoch), in one INSERT .. ON CONFLICT statement (no ORM flush); committed with
    the caller's transaction. The Artifact objects only carry the values and are not added
    to the session."""
    now = utcnow()
    values = [{"job_id": r.job_id, "tenant": r.tenant, "kind": r.kind, "name": r.name,
               "key": r.key, "size": r.size, "sha256": r.sha256, "meta": r.meta,
               "created_at": now} for r in rows]
    if not values:
        return
    insert = upsert_statement(session, Artifact.__table__)
    session.connection().execute(insert.on_conflict_do_update(
        index_elements=["job_id", "kind", "name"],
        set_={c: insert.excluded[c] for c in ("key", "size", "sha256", "meta")}), values)


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


def resume_index(session: Session, *, job_id: str) -> list[Any]:
    """resume_candidates as plain rows (id, kind, name, key, meta), not ORM objects: what the
    retention decision reads in an epoch's transaction."""
    return list(session.execute(
        select(Artifact.id, Artifact.kind, Artifact.name, Artifact.key, Artifact.meta)
        .where(Artifact.job_id == job_id, Artifact.kind.in_(("checkpoint", "optimizer")))
        .order_by(Artifact.name.desc())
    ).all())


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

def delete_ids(session: Session, ids: Iterable[int]) -> None:
    """Delete rows by id in one statement (with the caller's transaction)."""
    ids = list(ids)
    if ids:
        session.execute(delete(Artifact).where(Artifact.id.in_(ids))
                        .execution_options(synchronize_session=False))


def of_job(session: Session, *, job_id: str) -> list[Artifact]:
    """Every row of the job (the caller has checked it is the tenant's)."""
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id)))
