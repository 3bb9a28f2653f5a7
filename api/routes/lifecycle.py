"""What a tenant keeps: DELETE a finished job or an upload (files first, then rows), and
GET /v1/usage, the bytes and counts the storage quota is measured on."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.schemas import UsageOut
from convoy.artifacts import job_key
from db import artifacts, job_reads, uploads, usage
from db import jobs as jobs_db
from db.tables import Job

router = APIRouter(tags=["lifecycle"])


def _users_text(users: list[Job]) -> str:
    named = ", ".join(f"{j.id} ({j.state})" for j in users[:5])
    return f"{named}{' and more' if len(users) > 5 else ''}"


@router.delete("/v1/jobs/{job_id}", status_code=204, response_class=Response,
               tags=["jobs"])
def delete_job(job_id: str, session: SessionDep, principal: PrincipalDep,
               store: StoreDep) -> Response:
    """A finished job (succeeded, failed or canceled) with every file and row of it; 409 for
    a queued or running job (cancel it first) or one whose checkpoints a queued or running
    job starts from."""
    try:
        job = job_reads.get_job(session, job_id=job_id, tenant=principal.tenant)
    except job_reads.JobNotFound:
        raise HTTPException(404, f"job {job_id[:64]} not found") from None
    if job.state in jobs_db.ACTIVE:
        raise HTTPException(409, f"job {job_id} is {job.state}: cancel it first "
                                 f"(POST /v1/jobs/{job_id}/cancel)")
    users = jobs_db.active_users(session, tenant=principal.tenant, ref=job_id)
    if users:
        raise HTTPException(409, f"job {job_id}: its checkpoints are used by "
                                 f"{_users_text(users)}")
    keys = {a.key for a in artifacts.of_job(session, job_id=job_id)}
    keys |= {k for k, _ in store.list_keys(job_key(job_id) + "/")}
    session.rollback()  # no transaction held open over the deletes
    # Files first: a failure here leaves the job listed (and deletable again), never rows
    # without files' accounting or files nothing lists.
    for key in sorted(keys):
        store.delete(key)
    if not jobs_db.delete_job_rows(session, job_id=job_id):
        raise HTTPException(409, f"job {job_id} was queued again meanwhile")
    return Response(status_code=204)


@router.delete("/v1/uploads/{upload_id}", status_code=204, response_class=Response,
               tags=["uploads"])
def delete_upload(upload_id: str, session: SessionDep, principal: PrincipalDep,
                  store: StoreDep) -> Response:
    """A dataset, checkpoint or inputs upload; 409 while a queued or running job uses it."""
    row = uploads.find_any(session, id=upload_id, tenant=principal.tenant)
    if row is None:
        raise HTTPException(404, f"upload {upload_id[:64]} not found")
    users = jobs_db.active_users(session, tenant=principal.tenant, ref=upload_id)
    if users:
        raise HTTPException(409, f"upload {upload_id} is used by {_users_text(users)}")
    store.delete(row.key)
    uploads.delete(session, row=row)
    return Response(status_code=204)


@router.get("/v1/usage", response_model=UsageOut)
def get_usage(session: SessionDep, principal: PrincipalDep, settings: SettingsDep) -> UsageOut:
    u = usage.of_tenant(session, tenant=principal.tenant)
    return UsageOut(bytes=u.bytes, artifact_bytes=u.artifact_bytes,
                    upload_bytes=u.upload_bytes, jobs=u.jobs, artifacts=u.artifacts,
                    uploads=u.uploads, limit_bytes=settings.max_storage_bytes_per_tenant)
