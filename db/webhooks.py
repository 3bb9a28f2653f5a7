"""Webhooks: a tenant's endpoints, and the delivery outbox. A job's end writes one delivery
per subscribed endpoint in the transaction that ends the job (db.jobs calls job_ended), so
nothing is lost by a crash; the API's sender (api/webhooks.py) claims due deliveries, sends
them and records every attempt here."""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.base import rowcount, utcnow
from db.ids import new_id
from db.tables import Job, WebhookAttempt, WebhookDelivery, WebhookEndpoint

EVENTS = ("job.succeeded", "job.failed", "job.canceled")
SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    """A Standard Webhooks secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def create(session: Session, *, tenant: str, url: str, events: list[str]) -> WebhookEndpoint:
    endpoint = WebhookEndpoint(id=new_id(), tenant=tenant, url=url, events=list(events),
                               secret=new_secret(), created_at=utcnow())
    session.add(endpoint)
    session.commit()
    return endpoint


def count(session: Session, *, tenant: str) -> int:
    return session.scalar(select(func.count()).select_from(WebhookEndpoint)
                          .where(WebhookEndpoint.tenant == tenant)) or 0


def of_tenant(session: Session, *, tenant: str) -> list[WebhookEndpoint]:
    return list(session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.tenant == tenant)
                                .order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def get(session: Session, *, endpoint_id: str, tenant: str) -> WebhookEndpoint | None:
    return session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant == tenant)).one_or_none()


def remove(session: Session, *, endpoint_id: str, tenant: str) -> bool:
    """Delete the endpoint and its deliveries (the outbox rows go with it)."""
    ids = select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == endpoint_id)
    found = get(session, endpoint_id=endpoint_id, tenant=tenant)
    if found is None:
        return False
    # explicit, for SQLite connections without foreign keys enforced
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id))
    session.execute(delete(WebhookEndpoint).where(WebhookEndpoint.id == endpoint_id))
    session.commit()
    return True


def rotate(session: Session, *, endpoint_id: str, tenant: str) -> WebhookEndpoint | None:
    """A new secret; deliveries sent from now on are signed with it."""
    endpoint = get(session, endpoint_id=endpoint_id, tenant=tenant)
    if endpoint is None:
        return None
    endpoint.secret = new_secret()
    session.commit()
    return endpoint


# what a job's end event says: a transition can return these from its UPDATE (ended=...)
ENDED_COLUMNS = (Job.id, Job.tenant, Job.kind, Job.name, Job.state, Job.result, Job.error,
                 Job.attempt, Job.finished_at)


def job_ended(session: Session, *, job_id: str, ended: Any = None) -> int:
    """Queue a delivery of the job's end to each of its tenant's enabled endpoints that asked
    for that event; in the caller's transaction (committed with the state change). `ended`:
    the job's ENDED_COLUMNS as the caller's UPDATE returned them (saves reading them again).
    Returns how many were queued."""
    row = ended if ended is not None else session.execute(
        select(*ENDED_COLUMNS).where(Job.id == job_id)).one_or_none()
    if row is None:
        return 0
    event = f"job.{row.state}"
    endpoints = [e for e in session.scalars(select(WebhookEndpoint).where(
        WebhookEndpoint.tenant == row.tenant, WebhookEndpoint.disabled_at.is_(None)))
        if event in (e.events or [])]
    if not endpoints:
        return 0
    now = utcnow()
    body = json.dumps({
        "type": event,
        "timestamp": now.isoformat().replace("+00:00", "Z"),
        "data": {"id": row.id, "kind": row.kind, "name": row.name, "state": str(row.state),
                 "attempt": row.attempt, "result": row.result, "error": row.error,
                 "finished_at": row.finished_at.isoformat().replace("+00:00", "Z")
                 if row.finished_at else None},
    }, separators=(",", ":"), ensure_ascii=False)
    for endpoint in endpoints:
        session.add(WebhookDelivery(id="msg_" + new_id(), endpoint_id=endpoint.id, event=event,
                                    job_id=row.id, body=body, state="pending", attempts=0,
                                    next_at=now, created_at=now))
    return len(endpoints)


@dataclass(frozen=True)
class Claimed:
    """A delivery the sender took: what to send, where, signed with which secret."""

    id: str
    endpoint_id: str
    url: str
    secret: str
    body: str
    attempts: int


def claim_due(session: Session, *, limit: int, hold_seconds: float,
              now: datetime | None = None) -> list[Claimed]:
    """Take up to `limit` pending deliveries that are due: their next_at moves `hold_seconds`
    ahead, so no other sender takes them meanwhile, and if this process dies while sending
    they come due again after that. PostgreSQL: FOR UPDATE SKIP LOCKED, so several API
    processes share the work; SQLite: one writer at a time already."""
    now = now or utcnow()
    rows = session.execute(
        select(WebhookDelivery.id).where(WebhookDelivery.state == "pending",
                                         WebhookDelivery.next_at <= now)
        .order_by(WebhookDelivery.next_at).limit(limit)
        .with_for_update(skip_locked=True)
    ).scalars().all()
    if not rows:
        session.commit()
        return []
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id.in_(rows))
                    .values(next_at=now + timedelta(seconds=hold_seconds))
                    .execution_options(synchronize_session=False))
    found = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.endpoint_id, WebhookEndpoint.url,
               WebhookEndpoint.secret, WebhookDelivery.body, WebhookDelivery.attempts,
               WebhookEndpoint.disabled_at)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id.in_(rows))).all()
    claimed: list[Claimed] = []
    for d_id, endpoint_id, url, secret, body, attempts, disabled_at in found:
        if disabled_at is not None:
            _finish(session, d_id, "canceled", now)
            continue
        claimed.append(Claimed(id=d_id, endpoint_id=endpoint_id, url=url, secret=secret,
                               body=body, attempts=attempts))
    session.commit()
    return claimed


def _finish(session: Session, delivery_id: str, state: str, now: datetime) -> None:
    session.execute(update(WebhookDelivery).where(WebhookDelivery.id == delivery_id)
                    .values(state=state, finished_at=now)
                    .execution_options(synchronize_session=False))


def record_attempt(session: Session, *, delivery: Claimed, status: int | None,
                   response: str | None, error: str | None, duration_seconds: float,
                   retry_after_seconds: float | None) -> str:
    """Record one attempt and what follows: a 2xx ends the delivery `succeeded`; a 410
    ends it `failed` and disables the endpoint (its other pending deliveries are
    `canceled`); otherwise it is due again after `retry_after_seconds`, or, with None
    (the schedule is spent), `failed`. Returns the delivery's state."""
    now = utcnow()
    attempt = delivery.attempts + 1
    session.add(WebhookAttempt(delivery_id=delivery.id, attempt=attempt, at=now, status=status,
                               response=response, error=error,
                               duration_seconds=duration_seconds))
    values: dict[str, Any] = {"attempts": attempt}
    if status is not None and 200 <= status < 300:
        values.update(state="succeeded", finished_at=now)
    elif status == 410:
        values.update(state="failed", finished_at=now)
        session.execute(update(WebhookEndpoint).where(WebhookEndpoint.id == delivery.endpoint_id)
                        .values(disabled_at=now, disabled_reason=f"the receiver answered 410 "
                                f"Gone to delivery {delivery.id}")
                        .execution_options(synchronize_session=False))
        session.execute(update(WebhookDelivery).where(
            WebhookDelivery.endpoint_id == delivery.endpoint_id,
            WebhookDelivery.state == "pending", WebhookDelivery.id != delivery.id)
            .values(state="canceled", finished_at=now)
            .execution_options(synchronize_session=False))
    elif retry_after_seconds is None:
        values.update(state="failed", finished_at=now)
    else:
        values["next_at"] = now + timedelta(seconds=retry_after_seconds)
    done = rowcount(session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id == delivery.id,
                                      WebhookDelivery.state == "pending")
        .values(**values).execution_options(synchronize_session=False)))
    session.commit()
    return str(values.get("state", "pending")) if done else "gone"


def deliveries(session: Session, *, endpoint_id: str, limit: int
               ) -> list[tuple[WebhookDelivery, list[WebhookAttempt]]]:
    """The endpoint's newest deliveries with their attempts in order (the caller checked
    the endpoint is the tenant's)."""
    rows = list(session.scalars(select(WebhookDelivery)
                                .where(WebhookDelivery.endpoint_id == endpoint_id)
                                .order_by(WebhookDelivery.created_at.desc(),
                                          WebhookDelivery.id.desc()).limit(limit)))
    tries: dict[str, list[WebhookAttempt]] = {r.id: [] for r in rows}
    if rows:
        for a in session.scalars(select(WebhookAttempt)
                                 .where(WebhookAttempt.delivery_id.in_(list(tries)))
                                 .order_by(WebhookAttempt.attempt, WebhookAttempt.id)):
            tries[a.delivery_id].append(a)
    return [(r, tries[r.id]) for r in rows]


def failed_count(session: Session) -> int:
    """Deliveries that ended without a 2xx (for /metrics)."""
    return session.scalar(select(func.count()).select_from(WebhookDelivery)
                          .where(WebhookDelivery.state == "failed")) or 0


def pending_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(WebhookDelivery)
                          .where(WebhookDelivery.state == "pending")) or 0
