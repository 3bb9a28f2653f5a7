"""Sweeps (issue 20): submit, list, get, cancel. The trials are run by api.sweeper's driver."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException, Query, Request, Response
from pydantic import BaseModel

from api.deps import PrincipalDep, SessionDep, SettingsDep
from api.idempotency import canonical_json, conflict, idem_for
from api.sweeper import check_sweep
from convoy.sweepspec import SweepRequest
from db import sweeps as sweeps_db
from db.idempotency import KeyReused
from db.tables import Job, Sweep, SweepTrial

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"])


class TrialOut(BaseModel):
    number: int
    job_id: str | None
    params: dict[str, Any]
    # queued | running | succeeded | failed | canceled
    state: str
    value: float | None
    pruned: bool
    epochs: int
    error: str | None
    # for queued and running trials, the job's progress (0..1)
    progress: float


class BestOut(BaseModel):
    number: int
    job_id: str | None
    params: dict[str, Any]
    value: float


class SweepOut(BaseModel):
    id: str
    name: str
    state: str
    created_at: datetime
    finished_at: datetime | None
    error: str | None
    objective: dict[str, Any]
    trials_total: int
    parallel: int
    # ended trials / trials_total
    progress: float
    best: BestOut | None
    request: dict[str, Any]
    trials: list[TrialOut]


class SweepPage(BaseModel):
    items: list[SweepOut]


def sweep_out(sweep: Sweep, rows: list[tuple[SweepTrial, Job | None]]) -> SweepOut:
    spec = sweep.request["sweep"]
    trials = [TrialOut(number=t.number, job_id=t.job_id, params=t.params, state=t.state,
                       value=t.value, pruned=t.pruned, epochs=t.epochs, error=t.error,
                       progress=1.0 if t.state in ("succeeded", "failed", "canceled")
                       else float(j.progress if j else 0.0))
              for t, j in rows]
    ended = sum(t.state in ("succeeded", "failed", "canceled") for t in trials)
    return SweepOut(id=sweep.id, name=sweep.name, state=sweep.state,
                    created_at=sweep.created_at, finished_at=sweep.finished_at,
                    error=sweep.error, objective=spec.get("objective", {}),
                    trials_total=spec["trials"], parallel=spec["parallel"],
                    progress=ended / max(1, spec["trials"]),
                    best=BestOut.model_validate(sweep.best) if sweep.best else None,
                    request=spec, trials=trials)


def load(session: Any, sweep_id: str, tenant: str) -> Sweep:
    sweep = sweeps_db.get_sweep(session, sweep_id=sweep_id[:64], tenant=tenant)
    if sweep is None:
        raise HTTPException(404, f"sweep {sweep_id[:64]} not found")
    return sweep


@router.post("", status_code=201, response_model=SweepOut,
             responses={200: {"model": SweepOut, "description": "the sweep an earlier request "
                              "with the same Idempotency-Key and body created"}})
def submit_sweep(body: Annotated[SweepRequest, Body()], session: SessionDep,
                 settings: SettingsDep, principal: PrincipalDep, request: Request,
                 response: Response) -> SweepOut:
    """A sweep: `base` is a train job body, `space` maps its fields' paths (`train.lr`,
    `model.layers.0.out_channels`) to ranges or choices. Every trial is a train job."""
    spec = body.model_dump(mode="json")
    idem = idem_for(request, tenant=principal.tenant, route="POST /v1/sweeps",
                    parts=[canonical_json(spec)])
    base = check_sweep(session, body, settings, tenant=principal.tenant)
    session.rollback()
    try:
        sweep, created = sweeps_db.create_sweep(
            session, tenant=principal.tenant, name=body.name,
            request={"sweep": spec, "base": base}, idem=idem,
            idem_ttl_seconds=settings.idempotency_ttl_seconds)
    except KeyReused as exc:
        raise conflict(exc) from None
    response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
    if not created:
        response.status_code = 200
    return sweep_out(sweep, sweeps_db.trials(session, sweep_id=sweep.id))


@router.get("", response_model=SweepPage)
def list_sweeps(session: SessionDep, principal: PrincipalDep,
                limit: Annotated[int, Query(ge=1, le=200)] = 50) -> SweepPage:
    rows = sweeps_db.page(session, tenant=principal.tenant, limit=limit)
    return SweepPage(items=[sweep_out(s, sweeps_db.trials(session, sweep_id=s.id))
                            for s in rows])


@router.get("/{sweep_id}", response_model=SweepOut)
def get_sweep(sweep_id: str, session: SessionDep, principal: PrincipalDep) -> SweepOut:
    sweep = load(session, sweep_id, principal.tenant)
    return sweep_out(sweep, sweeps_db.trials(session, sweep_id=sweep.id))


@router.post("/{sweep_id}/cancel", response_model=SweepOut)
def cancel_sweep(sweep_id: str, session: SessionDep, principal: PrincipalDep) -> SweepOut:
    """Cancel the sweep and its queued and running trials; 409 when it has already ended."""
    sweep = load(session, sweep_id, principal.tenant)
    if not sweeps_db.cancel_sweep(session, sweep=sweep):
        session.refresh(sweep)
        raise HTTPException(409, f"sweep {sweep.id} is already {sweep.state}")
    session.expire_all()
    sweep = load(session, sweep_id, principal.tenant)
    return sweep_out(sweep, sweeps_db.trials(session, sweep_id=sweep.id))
