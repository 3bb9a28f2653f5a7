"""Idempotency keys: a POST retried with the same `Idempotency-Key` and the same body gets
the resource the first one created. The key row is written in the transaction that creates
the resource, and (tenant, key) is the primary key, so two requests racing with one key can
never both create something."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy.orm import Session

from db.base import rowcount, utcnow
from db.tables import IdempotencyKey


@dataclass(frozen=True)
class Idem:
    """A request's key, what it was sent to, and the hash of its canonical body."""

    tenant: str
    key: str
    route: str
    request_hash: str


class KeyReused(ValueError):
    """The key was already used with another body (or on another route)."""

    def __init__(self, idem: Idem, row: IdempotencyKey) -> None:
        where = "" if row.route == idem.route else f" on {row.route}"
        super().__init__(f"Idempotency-Key {idem.key[:80]!r} was already used{where} with a "
                         "different request body; use a new key for a new request")


def find(session: Session, idem: Idem, *, ttl_seconds: float) -> str | None:
    """The id of the resource this key created, None if the key is unused (or expired: the
    expired row is deleted here, so the key can be used afresh), or KeyReused."""
    row = session.get(IdempotencyKey, (idem.tenant, idem.key), populate_existing=True)
    if row is None:
        return None
    if row.created_at < utcnow() - timedelta(seconds=ttl_seconds):
        session.delete(row)
        session.flush()
        return None
    if row.route != idem.route or row.request_hash != idem.request_hash:
        raise KeyReused(idem, row)
    return row.resource_id


def remember(session: Session, idem: Idem, resource_id: str) -> None:
    """Add the key row; committed with the resource by the caller."""
    session.add(IdempotencyKey(tenant=idem.tenant, key=idem.key, route=idem.route,
                               request_hash=idem.request_hash, resource_id=resource_id,
                               created_at=utcnow()))


def forget(session: Session, idem: Idem) -> None:
    session.execute(delete(IdempotencyKey).where(IdempotencyKey.tenant == idem.tenant,
                                                 IdempotencyKey.key == idem.key))


def purge_expired(session: Session, *, ttl_seconds: float) -> int:
    """Delete keys older than the TTL (the reconciler's pass); returns how many."""
    cutoff = utcnow() - timedelta(seconds=ttl_seconds)
    result = session.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff)
                             .execution_options(synchronize_session=False))
    session.commit()
    return rowcount(result)

