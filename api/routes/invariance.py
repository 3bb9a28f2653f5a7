"""An invariance job's curves: per layer, how much its maps change against the magnitude of
each transform, and the model output's agreement (docs/invariance.md)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from api.deps import PrincipalDep, SessionDep
from api.routes.jobs import load_job
from api.schemas import InvarianceOut
from db.states import JobState

router = APIRouter(prefix="/v1/jobs", tags=["invariance"])


@router.get("/{job_id}/invariance", response_model=InvarianceOut)
def get_invariance(job_id: str, session: SessionDep, principal: PrincipalDep) -> InvarianceOut:
    """As the feature-map list does, a job that has not succeeded answers its state with no
    layers."""
    job = load_job(session, job_id, principal.tenant)
    if job.kind != "invariance":
        raise HTTPException(404, f"job {job_id} is a {job.kind} job: it has no invariance curves")
    result = (job.result or {}) if job.state == JobState.SUCCEEDED else {}
    return InvarianceOut.model_validate({
        "job_id": job.id, "state": job.state, "layers": result.get("layers", []),
        "output": result.get("output"), "original": result.get("original"),
        "images": result.get("images"), "transforms": result.get("transforms")})
