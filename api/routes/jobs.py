"""Jobs: submit, list, get, cancel, metrics, logs, checkpoints."""

from __future__ import annotations

import base64
import binascii
import re
from contextlib import nullcontext
from datetime import datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Body, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api import waiting
from api.auth import Principal, job_for_token
from api.deps import (
    CeleryDep,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    bearer_secret,
    gated_session,
    principal_from,
    token_cache,
    unauthorized,
)
from api.downloads import DOWNLOAD_RESPONSES, artifact_download
from api.idempotency import canonical_json, conflict, idem_for
from api.init import check_init
from api.jobwait import JobWaits, Subscription
from api.quota import check_storage
from api.schemas import (
    BINARY,
    AttemptOut,
    CheckpointOut,
    JobOut,
    JobPage,
    LogLine,
    MetricPoint,
    MetricsOut,
)
from api.submit import check_timeout, check_train
from convoy.jobspec import (
    EvaluateJobRequest,
    ExportJobRequest,
    FeatureMapsJobRequest,
    InvarianceJobRequest,
    JobRequest,
    TrainJobRequest,
    dump,
)
from convoy.queue import enqueue
from convoy.settings import Settings
from db import artifacts, attempts, job_reads, joblog, metrics
from db import jobs as jobs_db
from db.dispatch import devices_of
from db.idempotency import KeyReused
from db.ids import new_id
from db.states import TERMINAL_STATES, JobState
from db.tables import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Query(max_length=64)]
Kind = Literal["train", "feature_maps", "invariance", "evaluate", "export"]


def job_out(job: Job, waiting_reason: str | None = None) -> JobOut:
    out = JobOut.model_validate(job, from_attributes=True)
    out.waiting_reason = waiting_reason  # set: answered (null when nothing holds it up)
    return out


def with_reasons(session: Session, settings: Settings, jobs: list[Job]) -> list[JobOut]:
    """The jobs as answered, each queued one with its waiting_reason (api/waiting.py)."""
    queued = [(j.id, j.tenant, (j.request or {}).get("device"), devices_of(j.request))
              for j in jobs if j.state == JobState.QUEUED]
    found = waiting.reasons(session, settings, queued)
    return [job_out(j, waiting.reason_text(found.get(j.id))) for j in jobs]


def load_job(session: Session, job_id: str, tenant: str) -> Job:
    try:
        return job_reads.get_job(session, job_id=job_id, tenant=tenant)
    except job_reads.JobNotFound:
        raise HTTPException(404, f"job {job_id[:64]} not found") from None


# GET /v1/jobs/{id}?wait_seconds= and POST /v1/jobs with `Prefer: wait=`: the longest wait a
# request may ask for (a proxy in front typically cuts a request off after 60 s).
MAX_WAIT_SECONDS = 60.0

# RFC 7240's `wait` preference: `Prefer: wait=N` asks POST /v1/jobs to answer when the job
# has ended, or after N seconds (at most MAX_WAIT_SECONDS) with the job as it is then.
# The value is a token or a quoted string (RFC 7240 section 2): wait=5 and wait="5" alike.
_PREFER_WAIT = re.compile(r'(?:^|[,;])\s*wait\s*=\s*("[^"]*"|[^,;\s]*)', re.IGNORECASE)


def prefer_wait(prefer: str | None) -> float:
    """The seconds `Prefer: wait=N` asks for (0: none asked); 422 naming the header when N is
    not a number of seconds from 0 to MAX_WAIT_SECONDS."""
    found = _PREFER_WAIT.search(prefer or "")
    if found is None:
        return 0.0
    try:
        seconds = float(found.group(1).strip('"'))
    except ValueError:
        seconds = float("nan")
    if not 0 <= seconds <= MAX_WAIT_SECONDS:  # (NaN too)
        raise RequestValidationError([{
            "type": "value_error", "loc": ("header", "prefer"), "input": prefer,
            "msg": f"Prefer: wait={found.group(1)[:20]}: the wait must be a number of seconds "
                   f"from 0 to {MAX_WAIT_SECONDS:g}"}])
    return seconds


@router.post("", status_code=201, response_model=JobOut, response_model_exclude_unset=True,
             responses={200: {"model": JobOut, "description": "the job an earlier request "
                              "with the same Idempotency-Key and body created"}})
async def submit_job(
    body: Annotated[JobRequest, Body()],
    settings: SettingsDep,
    principal: PrincipalDep,
    celery: CeleryDep,
    request: Request,
    response: Response,
    prefer: Annotated[str | None, Header(
        max_length=200,
        description="`wait=N` (RFC 7240): answer when the job has ended, or after N seconds "
                    f"(0 to {MAX_WAIT_SECONDS:g}) with the job as it is then, as a long poll "
                    "would (GET /v1/jobs/{id}?wait_seconds=N); the answer then says "
                    "`Preference-Applied: wait=N`")] = None,
) -> Response:
    wait = prefer_wait(prefer)  # (before anything is created)
    # With a wait, the job's id is chosen here and subscribed to before its row is committed,
    # so its end cannot be missed and no read is needed until it wakes the wait. The session
    # (and its slot of the session gate) is given back before the wait: a waiting submission
    # holds neither, as a long poll does not.
    job_id = new_id() if wait else None
    waits: JobWaits = request.app.state.job_waits
    with waits.subscribe(job_id, ended_only=True) if job_id else nullcontext() as woken:
        async with gated_session(request, settings) as session:
            def submit() -> JobOut:
                try:
                    return _submit(body, session, settings, principal, celery, request,
                                   response, job_id=job_id)
                finally:
                    session.close()  # here, on this thread

            out = await run_in_threadpool(submit)
        # The JSON written straight from the schema, as GET /v1/jobs/{id} does.
        content = out.model_dump_json(exclude_unset=True).encode()
        headers = {"Location": response.headers["location"]}
        if wait:
            headers["Preference-Applied"] = f"wait={wait:g}"
            if out.state not in TERMINAL_STATES:
                deadline = anyio.current_time() + wait
                if woken is not None and out.id == job_id:
                    content = await _wait_for_end(request, settings, out.id, woken, deadline,
                                                  read_first=False)
                else:  # an earlier request's job (the same Idempotency-Key)
                    with waits.subscribe(out.id, ended_only=True) as theirs:
                        content = await _wait_for_end(request, settings, out.id, theirs,
                                                      deadline)
    return Response(content, status_code=response.status_code or 201, headers=headers,
                    media_type="application/json")


def _submit(body: TrainJobRequest | FeatureMapsJobRequest | InvarianceJobRequest
            | EvaluateJobRequest | ExportJobRequest, session: Session,
            settings: Settings, principal: Principal, celery: Any, request: Request,
            response: Response, job_id: str | None = None) -> JobOut:
    request_json = dump(body)
    idem = idem_for(request, tenant=principal.tenant, route="POST /v1/jobs",
                    parts=[canonical_json(request_json)])
    if isinstance(body, TrainJobRequest):
        summary = check_train(session, body, settings, tenant=principal.tenant)
        init = check_init(session, body, summary, tenant=principal.tenant)
        if init is not None:
            summary["init"] = init
    elif isinstance(body, InvarianceJobRequest):
        from api.invariance import check_invariance

        summary = check_invariance(session, body, settings, tenant=principal.tenant)
    elif isinstance(body, EvaluateJobRequest):
        from api.evaluate import check_evaluate

        summary = check_evaluate(session, body, settings, tenant=principal.tenant)
    elif isinstance(body, ExportJobRequest):
        from api.export import check_export

        summary = check_export(session, body, settings, tenant=principal.tenant)
    else:
        from api.feature_maps import check_feature_maps

        summary = check_feature_maps(session, body, settings, tenant=principal.tenant)
    timeout = check_timeout(body, settings)
    check_storage(session, settings, tenant=principal.tenant, what="job")
    # The quota count, the idempotency key and the insert in one transaction under the
    # tenant's lock: concurrent submissions can neither pass the quota nor reuse a key twice.
    try:
        job, created = jobs_db.create_job_once(
            session, tenant=principal.tenant, max_queued=settings.max_queued_per_tenant,
            idem=idem, idem_ttl_seconds=settings.idempotency_ttl_seconds,
            kind=body.kind, name=body.name, request=request_json, summary=summary,
            max_attempts=body.max_attempts or settings.max_attempts, timeout_seconds=timeout,
            job_id=job_id,
        )
    except jobs_db.QueueFull as exc:
        raise HTTPException(429, str(exc), headers={"Retry-After": "30"}) from None
    except KeyReused as exc:
        raise conflict(exc) from None
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:  # a retry: the job exists (and was sent, or the reconciler sends it)
        response.status_code = 200
        return job_out(job)
    # Committed before enqueue: the worker must find the row. If the broker is down the job
    # stays queued and the reconciler sends it later; nothing submitted is lost.
    try:
        enqueue(celery, kind=job.kind, job_id=job.id, device=body.device,
                devices=body.resources.devices if isinstance(body, TrainJobRequest) else 1,
                priority=body.priority)
    except Exception:  # noqa: BLE001 - the reconciler retries
        import logging

        logging.getLogger(__name__).warning("enqueue of %s failed; reconciler will retry",
                                            job.id, exc_info=True)
    return job_out(job)


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{job_id}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        stamp, job_id = raw.split("|", 1)
        at = datetime.fromisoformat(stamp)
        # A forged cursor must give 422, not reach the database (naive time, NUL, junk id).
        if at.tzinfo is None or not job_id.isalnum() or not job_id.isascii():
            raise ValueError(raw)
        return at, job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(422, "cursor: not a cursor this API returned") from None


@router.get("", response_model=JobPage, response_model_exclude_unset=True)
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    state: JobState | None = None,
    kind: Kind | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobPage:
    rows = job_reads.page(session, tenant=principal.tenant, state=state, kind=kind,
                          before=_decode_cursor(cursor) if cursor else None, limit=limit + 1)
    next_cursor = _encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) \
        if len(rows) > limit else None
    return JobPage(items=with_reasons(session, settings, rows[:limit]), next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, response_model_exclude_unset=True)
async def get_job(
    job_id: str, request: Request, settings: SettingsDep,
    wait_seconds: Annotated[float, Query(
        ge=0, le=MAX_WAIT_SECONDS,
        description="a long poll: answer as soon as the job has ended (succeeded, failed or "
                    "canceled), or after this many seconds with the job as it is then; 0 (the "
                    "default) answers at once")] = 0,
) -> Response:
    # Every poller's hot path (bench/bench_api.py measures it): one trip to the thread pool,
    # one SQL statement (token check joined to the read) and the JSON written straight from
    # the schema; FastAPI would dump the model, validate the dict again and encode it.
    # With PrincipalDep, a second query and a sync handler a poll took four pool trips.
    if token_cache(request.app).known_bad(bearer_secret(request)):
        raise unauthorized()  # a token seen to be bad lately: 401, no database
    if not wait_seconds:
        now = await _read_job(request, settings, job_id)
        assert now is not None
        return Response(now, media_type="application/json")
    # A long poll holds no connection (nor a slot of the session gate) while it waits; it is
    # subscribed before its first read, so an end committed after that read wakes it.
    waits: JobWaits = request.app.state.job_waits
    deadline = anyio.current_time() + wait_seconds
    with waits.subscribe(job_id, ended_only=True) as woken:
        body = await _wait_for_end(request, settings, job_id, woken, deadline)
    return Response(body, media_type="application/json")


async def _wait_for_end(request: Request, settings: Settings, job_id: str, woken: Subscription,
                        deadline: float, *, read_first: bool = True) -> bytes:
    """The job as answered once it has ended, or at `deadline` as it is then; `woken` was
    subscribed before the job could end unseen (`read_first=False`: before it was committed,
    so nothing to read until a wake-up). Reads while the job has not ended only look (no
    JSON, no waiting reasons); the last read is the answer."""
    body = await _read_job(request, settings, job_id, ended_only=True) if read_first else None
    while body is None and (left := deadline - anyio.current_time()) > 0:
        await woken.wait(min(left, request.app.state.job_waits.recheck_seconds))
        body = await _read_job(request, settings, job_id,  # the last read: the answer
                               ended_only=deadline > anyio.current_time())
    if body is None:
        body = await _read_job(request, settings, job_id)
    assert body is not None  # (a read that is not ended_only always answers)
    return body


async def _read_job(request: Request, settings: Settings, job_id: str, *,
                    ended_only: bool = False) -> bytes | None:
    """The job as answered (`ended_only`: None instead while it has not ended): the token
    check and the read in one statement, on one thread-pool trip; 401 or 404."""
    async with gated_session(request, settings, read_only=True) as session:
        def read() -> bytes | None:
            try:
                job = job_for_token(session, job_id, bearer_secret(request))
                if job is None:
                    principal_from(request, session)  # 401 for a bad token, else the job is
                    raise HTTPException(404, f"job {job_id[:64]} not found")  # not there for it
                if ended_only and job.state not in TERMINAL_STATES:
                    return None
                # a queued job says why it waits (two short reads, only while it is queued)
                out = with_reasons(session, settings, [job])[0] \
                    if job.state == JobState.QUEUED else job_out(job)
                return out.model_dump_json(exclude_unset=True).encode()
            finally:
                session.close()

        return await run_in_threadpool(read)


@router.post("/{job_id}/cancel", response_model=JobOut, response_model_exclude_unset=True)
def cancel_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobOut:
    load_job(session, job_id, principal.tenant)
    try:
        job = jobs_db.cancel_job(session, job_id=job_id, tenant=principal.tenant)
    except jobs_db.WrongState as exc:
        raise HTTPException(409, str(exc)) from None
    return job_out(job)


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def get_metrics(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    name: Annotated[str | None, Query(max_length=64)] = None,
) -> MetricsOut:
    load_job(session, job_id, principal.tenant)
    series: dict[str, list[MetricPoint]] = {}
    for m in metrics.series(session, job_id=job_id, name=name):
        series.setdefault(m.name, []).append(MetricPoint(step=m.step, epoch=m.epoch, value=m.value))
    return MetricsOut(series=series)


@router.get("/{job_id}/attempts", response_model=list[AttemptOut])
def get_attempts(job_id: str, session: SessionDep, principal: PrincipalDep
                 ) -> list[AttemptOut]:
    """Each claim of the job by a worker, in order: worker, device, start, end, outcome
    and error (the lease history)."""
    load_job(session, job_id, principal.tenant)
    return [AttemptOut(attempt=a.attempt, worker_id=a.worker_id, device=a.device,
                       started_at=a.started_at, ended_at=a.ended_at,
                       outcome=str(a.outcome) if a.outcome else None, error=a.error)
            for a in attempts.of_job(session, job_id=job_id)]


@router.get("/{job_id}/logs", response_model=list[LogLine])
def get_logs(job_id: str, session: SessionDep, principal: PrincipalDep) -> list[LogLine]:
    load_job(session, job_id, principal.tenant)
    return [LogLine(at=r.at, level=r.level, message=r.message)
            for r in joblog.lines(session, job_id=job_id)]


@router.get("/{job_id}/checkpoints", response_model=list[CheckpointOut])
def list_checkpoints(job_id: str, session: SessionDep, principal: PrincipalDep
                     ) -> list[CheckpointOut]:
    load_job(session, job_id, principal.tenant)
    return [CheckpointOut(name=a.name, epoch=(a.meta or {}).get("epoch"), size=a.size,
                          sha256=a.sha256, created_at=a.created_at)
            for a in artifacts.checkpoints(session, job_id=job_id)]


@router.get("/{job_id}/checkpoints/{name}", response_class=Response,
            responses={200: {"content": {"application/octet-stream": BINARY},
                             "description": "the checkpoint's .safetensors file, streamed; "
                                            "`X-Sha256` is its recorded sha256"},
                       **DOWNLOAD_RESPONSES})
def download_checkpoint(job_id: str, name: str, request: Request, session: SessionDep,
                        principal: PrincipalDep, store: StoreDep, settings: SettingsDep
                        ) -> Response:
    """`name` is looked up among the job's artifact rows (or `last`), never joined into a path.
    Streamed from the store; one `Range` honoured (206), or 302 to a presigned URL."""
    load_job(session, job_id, principal.tenant)
    found = artifacts.checkpoints(session, job_id=job_id)
    match = found[-1:] if name in ("last", "latest") else [a for a in found if a.name == name]
    if not match:
        raise HTTPException(404, f"checkpoint {name[:80]!r} not found for job {job_id}")
    artifact = match[0]
    return artifact_download(
        request, store, settings, artifact, filename=artifact.name,
        missing=f"checkpoint {artifact.name} of job {job_id}: its file is missing from the "
                "artifact store",
        headers={"X-Checkpoint-Name": artifact.name})
