"""An evaluate job's predictions, a page at a time: per input its top-k classes with their
probabilities (the job's result holds loss, accuracy, confusion matrix, per-class scores);
and an export job's file."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.downloads import DOWNLOAD_RESPONSES, artifact_download
from api.routes.jobs import load_job
from api.schemas import BINARY, Prediction, PredictionsOut
from db import artifacts
from db.states import JobState

router = APIRouter(prefix="/v1/jobs", tags=["evaluate"])

PREDICTIONS = "predictions.json"


@router.get("/{job_id}/predictions", response_model=PredictionsOut,
            response_model_by_alias=True)
def get_predictions(job_id: str, session: SessionDep, principal: PrincipalDep,
                    store: StoreDep,
                    offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Response:
    job = load_job(session, job_id, principal.tenant)
    if job.kind != "evaluate":
        raise HTTPException(404, f"job {job_id} is a {job.kind} job: it has no predictions")
    items: list[Prediction] = []
    total = 0
    if job.state == JobState.SUCCEEDED:
        row = artifacts.find(session, job_id=job.id, tenant=principal.tenant,
                             kind="predictions", name=PREDICTIONS)
        if row is None:
            raise HTTPException(404, f"job {job_id}: its predictions are missing")
        session.close()
        stored = json.loads(store.get_bytes(row.key))
        total = len(stored)
        items = [Prediction.model_validate(p) for p in stored[offset:offset + limit]]
    out = PredictionsOut(job_id=job.id, state=job.state, total=total, offset=offset,
                         items=items,
                         next_offset=offset + limit if offset + limit < total else None)
    return Response(out.model_dump_json(by_alias=True), media_type="application/json")


@router.get("/{job_id}/export", response_class=Response,
            responses={200: {"content": {"application/octet-stream": BINARY},
                             "description": "the exported model (model.onnx or model.pt), "
                                            "streamed; `X-Sha256` is its sha256"},
                       **DOWNLOAD_RESPONSES})
def download_export(job_id: str, request: Request, session: SessionDep,
                    principal: PrincipalDep, store: StoreDep, settings: SettingsDep
                    ) -> Response:
    """An export job's file, once it has succeeded (404 before)."""
    job = load_job(session, job_id, principal.tenant)
    if job.kind != "export":
        raise HTTPException(404, f"job {job_id} is a {job.kind} job: it has no export")
    found = artifacts.of_kind(session, job_id=job.id, tenant=principal.tenant, kind="export")
    if not found:
        raise HTTPException(404, f"job {job_id} ({job.state}) has no exported file yet")
    artifact = found[0]
    return artifact_download(
        request, store, settings, artifact, filename=artifact.name,
        missing=f"export {artifact.name} of job {job_id}: its file is missing from the store")
