"""GET /v1/jobs/{id}/events: server-sent events for a job's states, progress and metric points,
polled from the database (the single source of truth) and ending when the job ends."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from api.auth import authenticate
from api.deps import SettingsDep
from convoy.settings import Settings
from db import jobs as jobs_db
from db.session import get_sessionmaker
from db.tables import TERMINAL_STATES, Job, JobAttempt, Metric

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["events"])

POLL_SECONDS = 0.3
# A comment line now and then keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_SECONDS = 15.0
ID_PATTERN = re.compile(r"^(\d{1,6})-(\d{1,19})-(\d{1,5})$")


@dataclass
class Cursor:
    """Where a client is in the stream; every event id is the cursor just after that event,
    so `Last-Event-ID` alone says what to resend."""

    states: int = 0
    metric_id: int = 0
    progress: int = 0  # progress in 1/10000ths

    def __str__(self) -> str:
        return f"{self.states}-{self.metric_id}-{self.progress}"

    @classmethod
    def parse(cls, raw: str | None) -> Cursor:
        if not raw:
            return cls()
        match = ID_PATTERN.match(raw.strip())
        if match is None:
            raise HTTPException(422, [{"loc": ["header", "Last-Event-ID"], "type": "value_error",
                                       "msg": "Last-Event-ID: not an id this stream sent"}])
        return cls(*(int(g) for g in match.groups()))


def state_history(job: Job, attempts: list[JobAttempt]) -> list[dict[str, Any]]:
    """The job's states in order, rebuilt from the lease history, so a poll that missed a short
    `running` (or a requeue) still reports it."""
    history: list[dict[str, Any]] = [
        {"state": "queued", "attempt": 1, "at": job.created_at.isoformat()}]
    for i, attempt in enumerate(attempts):
        history.append({"state": "running", "attempt": attempt.attempt,
                        "worker": attempt.worker_id, "at": attempt.started_at.isoformat()})
        requeued = attempt.outcome in ("lease_expired", "released") and (
            i + 1 < len(attempts) or (job.state == "queued" and job.attempt > attempt.attempt))
        if requeued:
            history.append({"state": "queued", "attempt": attempt.attempt + 1,
                            "at": (attempt.ended_at or job.updated_at).isoformat()})
    if job.state in TERMINAL_STATES:
        history.append({"state": job.state, "attempt": job.attempt, "error": job.error,
                        "result": job.result,
                        "at": (job.finished_at or job.updated_at).isoformat()})
    return history


@dataclass
class Snapshot:
    state: str
    history: list[dict[str, Any]]
    progress: float
    metrics: list[Metric]


def read_snapshot(settings: Settings, job_id: str, after_metric: int) -> Snapshot:
    """One short session per poll: no connection is held while the stream sleeps."""
    with get_sessionmaker(settings.database_url)() as session:
        # The job row first: when it says the job ended, every metric it wrote is committed
        # and the metric query below (a later statement) sees all of them.
        job = jobs_db.get_job(session, job_id=job_id)
        attempts = list(session.scalars(
            select(JobAttempt).where(JobAttempt.job_id == job_id)
            .order_by(JobAttempt.attempt, JobAttempt.id)))
        metrics = list(session.scalars(
            select(Metric).where(Metric.job_id == job_id, Metric.id > after_metric)
            .order_by(Metric.id)))
        return Snapshot(job.state, state_history(job, attempts), job.progress, metrics)


def sse(event: str, cursor: Cursor, data: dict[str, Any]) -> bytes:
    return f"id: {cursor}\nevent: {event}\ndata: {json.dumps(data)}\n\n".encode()


def poll_events(snap: Snapshot, cursor: Cursor) -> tuple[list[bytes], bool]:
    """The frames a snapshot adds after `cursor` (which it advances), and whether the stream
    is done. Progress first (an epoch's progress is written with its metrics), then metric
    points as one event per step (one per epoch for train jobs), then the terminal state."""
    frames: list[bytes] = []
    terminal = snap.state in TERMINAL_STATES
    live_states = snap.history[:-1] if terminal else snap.history
    while cursor.states < len(live_states):
        cursor.states += 1
        frames.append(sse("state", cursor, live_states[cursor.states - 1]))
    progress = round(snap.progress * 10000)
    if progress != cursor.progress:
        cursor.progress = progress
        frames.append(sse("progress", cursor, {"progress": snap.progress}))
    by_step: dict[int, list[Metric]] = {}
    for m in snap.metrics:
        by_step.setdefault(m.step, []).append(m)
    for step, points in by_step.items():
        cursor.metric_id = max(cursor.metric_id, *(p.id for p in points))
        frames.append(sse("metric", cursor, {
            "step": step, "epoch": points[0].epoch,
            "values": {p.name: p.value for p in points}}))
    if terminal and cursor.states < len(snap.history):
        cursor.states = len(snap.history)
        frames.append(sse("state", cursor, snap.history[-1]))
    return frames, terminal


def _authorize(settings: Settings, job_id: str, secret: str) -> None:
    with get_sessionmaker(settings.database_url)() as session:
        principal = authenticate(session, secret)
        if principal is None:
            raise HTTPException(401, "missing, invalid or revoked token",
                                headers={"WWW-Authenticate": "Bearer"})
        _load(session, job_id, principal.tenant)


def _load(session: Session, job_id: str, tenant: str) -> None:
    try:
        jobs_db.get_job(session, job_id=job_id, tenant=tenant)
    except jobs_db.JobNotFound:
        raise HTTPException(404, f"job {job_id[:64]} not found") from None


@router.get("/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
async def stream_events(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    authorization: Annotated[str | None, Header()] = None,
    last_event_id: Annotated[str | None, Header(max_length=64)] = None,
    token: Annotated[str | None, Query(max_length=256,
                                       description="for EventSource, which sends no headers")
                     ] = None,
) -> StreamingResponse:
    """Events `state`, `metric` and `progress`; each id resumes the stream via Last-Event-ID."""
    scheme, _, secret = (authorization or "").partition(" ")
    secret = secret.strip() if scheme.lower() == "bearer" else (token or "")
    cursor = Cursor.parse(last_event_id)
    await anyio.to_thread.run_sync(_authorize, settings, job_id, secret)

    async def frames() -> AsyncIterator[bytes]:
        quiet = 0.0
        while True:
            try:
                snap = await anyio.to_thread.run_sync(read_snapshot, settings, job_id,
                                                      cursor.metric_id)
            except jobs_db.JobNotFound:
                return  # deleted while watched: nothing more will happen to it
            except OperationalError:
                # The database is away (a restart, a failover): keep the stream open and try
                # again, as the workers do, rather than make every watcher reconnect.
                log.warning("events for job %s: database unavailable, retrying", job_id)
                snap = None
            out, done = poll_events(snap, cursor) if snap is not None else ([], False)
            for frame in out:
                yield frame
            if done:
                return
            quiet = 0.0 if out else quiet + POLL_SECONDS
            if quiet >= KEEPALIVE_SECONDS:
                quiet = 0.0
                yield b": keepalive\n\n"
            if await request.is_disconnected():
                return
            await anyio.sleep(POLL_SECONDS)

    return StreamingResponse(frames(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
