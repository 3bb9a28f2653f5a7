"""Sweeps and their trials (issue 20). A trial's row and its train job's row are written in
one transaction, with the trial's number unique in its sweep: a driver that dies between
asking for a trial and committing it loses nothing, and two drivers cannot both create
trial n."""

from __future__ import annotations

from contextlib import suppress
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import idempotency
from db import jobs as jobs_db
from db.base import rowcount, utcnow
from db.ids import new_id
from db.states import JobState
from db.tables import Job, Metric, Sweep, SweepTrial

RUNNING, SUCCEEDED, FAILED, CANCELED = "running", "succeeded", "failed", "canceled"


def create_sweep(session: Session, *, tenant: str, name: str, request: dict[str, Any],
                 idem: idempotency.Idem | None = None,
                 idem_ttl_seconds: float = 24 * 3600.0) -> tuple[Sweep, bool]:
    """(sweep, created): a new running sweep, committed; or, for an Idempotency-Key already
    used with the same body, the sweep it created (db.idempotency.KeyReused for another
    body). The key and the row share one transaction under the tenant's lock."""
    jobs_db.lock_tenant_writes(session, tenant)
    if idem is not None:
        existing = idempotency.find(session, idem, ttl_seconds=idem_ttl_seconds)
        found = session.get(Sweep, existing) if existing else None
        if found is not None:
            session.commit()
            return found, False
        if existing is not None:
            idempotency.forget(session, idem)
    now = utcnow()
    sweep = Sweep(id=new_id(), tenant=tenant, name=name, state=RUNNING, request=request,
                  created_at=now, updated_at=now)
    session.add(sweep)
    if idem is not None:
        idempotency.remember(session, idem, sweep.id)
    session.commit()
    return sweep, True


def get_sweep(session: Session, *, sweep_id: str, tenant: str | None = None) -> Sweep | None:
    query = select(Sweep).where(Sweep.id == sweep_id)
    if tenant is not None:
        query = query.where(Sweep.tenant == tenant)
    return session.scalars(query).one_or_none()


def page(session: Session, *, tenant: str, limit: int,
         before: tuple[datetime, str] | None = None) -> list[Sweep]:
    query = select(Sweep).where(Sweep.tenant == tenant)
    if before is not None:
        at, sweep_id = before
        query = query.where((Sweep.created_at < at)
                            | ((Sweep.created_at == at) & (Sweep.id < sweep_id)))
    return list(session.scalars(query.order_by(Sweep.created_at.desc(), Sweep.id.desc())
                                .limit(limit)))


def running_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Sweep.id).where(Sweep.state == RUNNING)
                                .order_by(Sweep.created_at)))


def trials(session: Session, *, sweep_id: str) -> list[tuple[SweepTrial, Job | None]]:
    """The sweep's trials in number order, each with its job (None for a trial refused at
    validation)."""
    rows = session.execute(
        select(SweepTrial, Job).outerjoin(Job, Job.id == SweepTrial.job_id)
        .where(SweepTrial.sweep_id == sweep_id).order_by(SweepTrial.number)).all()
    return [(t, j) for t, j in rows]


def metric_by_epoch(session: Session, *, job_ids: list[str], name: str
                    ) -> dict[str, dict[int, float]]:
    """Each job's `name` metric, keyed by epoch (the pruner's intermediate values)."""
    out: dict[str, dict[int, float]] = {}
    if not job_ids:
        return out
    for job_id, epoch, value in session.execute(
            select(Metric.job_id, Metric.epoch, Metric.value)
            .where(Metric.job_id.in_(job_ids), Metric.name == name)):
        out.setdefault(job_id, {})[int(epoch)] = float(value)
    return out


def add_trial(session: Session, *, sweep: Sweep, number: int, params: dict[str, Any],
              max_queued: int, job_fields: dict[str, Any] | None = None,
              error: str | None = None) -> Job | None | bool:
    """Trial `number` of `sweep`: with `job_fields`, its queued train job and its row in one
    transaction under the tenant's submission lock (jobs.QueueFull past the tenant's queued
    quota); with `error`, a failed trial without a job. Returns the job (or True for a
    failed trial), or False when trial `number` already exists (another driver made it)."""
    jobs_db.lock_tenant_writes(session, sweep.tenant)
    if session.scalar(select(func.count()).select_from(SweepTrial).where(
            SweepTrial.sweep_id == sweep.id, SweepTrial.number == number)):
        session.rollback()
        return False
    job: Job | None = None
    if job_fields is not None:
        queued = session.scalar(select(func.count()).select_from(Job).where(
            Job.tenant == sweep.tenant, Job.state == JobState.QUEUED)) or 0
        if queued >= max_queued:
            session.rollback()
            raise jobs_db.QueueFull(queued, max_queued)
        job = jobs_db.create_job(session, tenant=sweep.tenant, **job_fields)
        job.sweep_id = sweep.id
    session.add(SweepTrial(sweep_id=sweep.id, number=number, params=params,
                           job_id=job.id if job else None,
                           state=JobState.QUEUED if job else FAILED, error=error,
                           pruned=False, epochs=0, pruner_attrs={}, created_at=utcnow()))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        return False
    return job if job is not None else True


def update_trial(session: Session, *, trial_id: int, **values: Any) -> None:
    session.execute(update(SweepTrial).where(SweepTrial.id == trial_id).values(**values)
                    .execution_options(synchronize_session=False))
    session.commit()


def finish_sweep(session: Session, *, sweep_id: str, state: str,
                 best: dict[str, Any] | None, error: str | None = None) -> bool:
    """running -> succeeded | failed, once."""
    now = utcnow()
    done = rowcount(session.execute(
        update(Sweep).where(Sweep.id == sweep_id, Sweep.state == RUNNING)
        .values(state=state, best=best, error=error, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False))) == 1
    session.commit()
    return done


def set_best(session: Session, *, sweep_id: str, best: dict[str, Any] | None) -> None:
    session.execute(update(Sweep).where(Sweep.id == sweep_id)
                    .values(best=best, updated_at=utcnow())
                    .execution_options(synchronize_session=False))
    session.commit()


def cancel_sweep(session: Session, *, sweep: Sweep) -> bool:
    """running -> canceled, and every queued or running trial's job canceled. False when the
    sweep had already ended (nothing changes)."""
    now = utcnow()
    done = rowcount(session.execute(
        update(Sweep).where(Sweep.id == sweep.id, Sweep.state == RUNNING)
        .values(state=CANCELED, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False))) == 1
    session.commit()
    if not done:
        return False
    active = session.scalars(select(Job.id).where(
        Job.sweep_id == sweep.id, Job.state.in_((JobState.QUEUED, JobState.RUNNING))))
    for job_id in list(active):
        with suppress(jobs_db.WrongState):  # it ended meanwhile
            jobs_db.cancel_job(session, job_id=job_id, tenant=sweep.tenant)
    return True
