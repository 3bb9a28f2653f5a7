"""Reads of jobs: one job (scoped to a tenant, or to a live token of its tenant), a page of a
tenant's jobs, a job's state and its running-time budget. The writes are db.jobs'."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from db.dispatch import devices_of
from db.states import JobState
from db.tables import Job, JobAttempt, Token


class JobNotFound(LookupError):
    pass


def get_job(session: Session, *, job_id: str, tenant: str | None = None,
            kind: str | None = None) -> Job:
    """The job, or JobNotFound; with a tenant, another tenant's job is not found either (nor,
    with a kind, a job of another kind)."""
    query = select(Job).where(Job.id == job_id)
    if tenant is not None:
        query = query.where(Job.tenant == tenant)
    if kind is not None:
        query = query.where(Job.kind == kind)
    job = session.scalars(query).one_or_none()
    if job is None:
        raise JobNotFound(job_id)
    return job


def job_state(session: Session, *, job_id: str) -> str | None:
    return session.scalar(select(Job.state).where(Job.id == job_id))


def for_token(session: Session, *, job_id: str, token_hash: str) -> Job | None:
    """The job, if `token_hash` is a live token of the job's tenant: the token check and the
    read in one statement (a status poll's whole database cost)."""
    return session.scalars(
        select(Job).join(Token, Token.tenant == Job.tenant).where(
            Job.id == job_id, Token.token_hash == token_hash, Token.revoked_at.is_(None))
    ).one_or_none()


def page(session: Session, *, tenant: str, limit: int, state: str | None = None,
         kind: str | None = None, before: tuple[datetime, str] | None = None) -> list[Job]:
    """The tenant's jobs newest first (by created_at, then id), at most `limit`; `before` is
    the (created_at, id) of the last job of the previous page."""
    query = select(Job).where(Job.tenant == tenant)
    if state:
        query = query.where(Job.state == state)
    if kind:
        query = query.where(Job.kind == kind)
    if before is not None:
        at, last_id = before
        # `created_at <= at` is implied by the OR, and spelled out because it is what an
        # index can start from: without it the page reads every newer job before the cursor
        # (O(depth)); with it, the index scan starts at the cursor (O(limit)).
        query = query.where(Job.created_at <= at,
                            or_(Job.created_at < at, and_(Job.created_at == at, Job.id < last_id)))
    return list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit)))


def timeout_and_prior_seconds(session: Session, *, job_id: str) -> tuple[float | None, float]:
    """(the job's timeout, the running time of its ended attempts) in seconds. An attempt
    counts from its claim to its end (for a lost worker: until its lease expired); time spent
    queued does not count, nor an attempt row never closed."""
    timeout = session.scalar(select(Job.timeout_seconds).where(Job.id == job_id))
    rows = session.execute(
        select(JobAttempt.started_at, JobAttempt.ended_at)
        .where(JobAttempt.job_id == job_id, JobAttempt.ended_at.is_not(None))
    ).all()
    prior = sum(max(0.0, (end - start).total_seconds()) for start, end in rows
                if end is not None)  # (never None here: the query asks for ended rows)
    return (float(timeout) if timeout is not None else None), prior


def running_counts(session: Session, *, tenants: Iterable[str]) -> dict[str, int]:
    """tenant -> how many of its jobs run now."""
    names = list(set(tenants))
    if not names:
        return {}
    return {tenant: n for tenant, n in session.execute(
        select(Job.tenant, func.count()).where(Job.tenant.in_(names),
                                               Job.state == JobState.RUNNING)
        .group_by(Job.tenant))}


def queued_routes(session: Session, *, limit: int = 10000
                  ) -> list[tuple[str, str, str | None, int]]:
    """(id, tenant, device asked for, device count) of the oldest `limit` queued jobs."""
    rows = session.execute(select(Job.id, Job.tenant, Job.request)
                           .where(Job.state == JobState.QUEUED)
                           .order_by(Job.enqueued_at).limit(limit))
    return [(i, tenant, (request or {}).get("device"), devices_of(request))
            for i, tenant, request in rows]
