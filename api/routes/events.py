"""GET /v1/jobs/{id}/events: server-sent events for a job's states, progress and metric points,
polled from the database (the single source of truth) and ending when the job ends."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from starlette.types import Receive, Scope, Send

from api.auth import job_for_token
from api.deps import SettingsDep, check_token
from api.jobwait import Subscription
from convoy.settings import Settings
from db import attempts as attempts_db
from db import job_reads
from db import metrics as metrics_db
from db.session import get_sessionmaker
from db.states import TERMINAL_STATES, AttemptOutcome, JobState
from db.tables import Job, JobAttempt, Metric

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["events"])

POLL_SECONDS = 0.3
# A comment line now and then keeps proxies and load balancers from closing an idle stream.
KEEPALIVE_SECONDS = 15.0
# [0-9], not \d: \d also matches "٣" and "３", which int() reads as 3
ID_PATTERN = re.compile(r"^([0-9]{1,6})-([0-9]{1,19})-([0-9]{1,5})$")
# Metric ids are 64-bit signed integers in the database: a larger Last-Event-ID is not an id
# this stream sent (it crashed the stream with an overflow).
MAX_METRIC_ID = 2**63 - 1
MAX_PROGRESS = 10000
# Stream polls and token re-checks run on threads of their own: open streams cannot take the
# shared thread pool from ordinary requests (500 streams made a plain GET take 0.8 s).
STREAM_LIMITER = anyio.CapacityLimiter(8)


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
        cursor = cls(*(int(g) for g in match.groups()))
        if cursor.metric_id > MAX_METRIC_ID or cursor.progress > MAX_PROGRESS:
            raise HTTPException(422, [{"loc": ["header", "Last-Event-ID"], "type": "value_error",
                                       "msg": "Last-Event-ID: out of range, not an id this "
                                              "stream sent"}])
        return cursor


# attempts after which the job went back to the queue (when another attempt followed)
REQUEUED_AFTER = (AttemptOutcome.LEASE_EXPIRED, AttemptOutcome.RELEASED,
                  AttemptOutcome.STORE_ERROR)


def state_history(job: Job, attempts: list[JobAttempt]) -> list[dict[str, Any]]:
    """The job's states in order, rebuilt from the lease history, so a poll that missed a short
    `running` (or a requeue) still reports it."""
    history: list[dict[str, Any]] = [
        {"state": JobState.QUEUED, "attempt": 1, "at": job.created_at.isoformat()}]
    for i, attempt in enumerate(attempts):
        history.append({"state": JobState.RUNNING, "attempt": attempt.attempt,
                        "worker": attempt.worker_id, "at": attempt.started_at.isoformat()})
        requeued = attempt.outcome in REQUEUED_AFTER and (
            i + 1 < len(attempts) or (job.state == JobState.QUEUED
                                      and job.attempt > attempt.attempt))
        if requeued:
            history.append({"state": JobState.QUEUED, "attempt": attempt.attempt + 1,
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
        job = job_reads.get_job(session, job_id=job_id)
        attempts = attempts_db.of_job(session, job_id=job_id)
        metrics = metrics_db.after(session, job_id=job_id, after_id=after_metric)
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


def _load_job(settings: Settings, job_id: str, tenant: str) -> None:
    with get_sessionmaker(settings.database_url)() as session:
        _load(session, job_id, tenant)


def _still_allowed(settings: Settings, job_id: str, secret: str) -> bool:
    """The token is still live and of the job's tenant: one statement, no cache, so a
    revocation closes the stream at the next re-check."""
    with get_sessionmaker(settings.database_url)() as session:
        return job_for_token(session, job_id, secret) is not None


def _load(session: Session, job_id: str, tenant: str) -> None:
    try:
        job_reads.get_job(session, job_id=job_id, tenant=tenant)
    except job_reads.JobNotFound:
        raise HTTPException(404, f"job {job_id[:64]} not found") from None


@dataclass
class StreamSlots:
    """Open event streams of this API process, per tenant and in total."""

    per_tenant: int
    total: int
    open: dict[str, int] = field(default_factory=dict)

    def take(self, tenant: str) -> Callable[[], None]:
        """A slot for one stream, or 429; returns the function that gives it back (once)."""
        count = self.open.get(tenant, 0)
        if count >= self.per_tenant:
            raise HTTPException(429, f"tenant has {count} open event streams, the limit "
                                     f"max_streams_per_tenant is {self.per_tenant}",
                                headers={"Retry-After": "5"})
        if sum(self.open.values()) >= self.total:
            raise HTTPException(429, f"the API has {self.total} open event streams, the limit "
                                     "max_streams_total: retry shortly",
                                headers={"Retry-After": "5"})
        self.open[tenant] = count + 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self.open[tenant] -= 1
                if not self.open[tenant]:
                    del self.open[tenant]

        return give_back


def stream_slots(app: FastAPI) -> StreamSlots:
    slots = getattr(app.state, "stream_slots", None)
    if slots is None:
        settings: Settings = app.state.settings
        slots = app.state.stream_slots = StreamSlots(settings.max_streams_per_tenant,
                                                     settings.max_streams_total)
    return slots


class SlotStream(StreamingResponse):
    """A stream that gives its slot back however it ends (done, disconnect, error)."""

    def __init__(self, content: AsyncIterator[bytes], give_back: Callable[[], None],
                 **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.give_back = give_back

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.give_back()


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
    principal = await check_token(request, secret)
    if principal is None:
        raise HTTPException(401, "missing, invalid or revoked token",
                            headers={"WWW-Authenticate": "Bearer"})
    await anyio.to_thread.run_sync(_load_job, settings, job_id, principal.tenant,
                                   limiter=STREAM_LIMITER)
    give_back = stream_slots(request.app).take(principal.tenant)

    async def frames() -> AsyncIterator[bytes]:
        # a state change (PostgreSQL's NOTIFY, api/jobwait.py) ends the wait between two
        # reads at once: the stream says `succeeded` when the job ends, not up to a poll late
        with request.app.state.job_waits.subscribe(job_id) as woken:
            async for frame in watch(woken):
                yield frame

    async def watch(woken: Subscription) -> AsyncIterator[bytes]:
        quiet = 0.0
        checked = time.monotonic()
        while True:
            if time.monotonic() - checked >= settings.stream_recheck_seconds:
                # A long-lived stream re-checks its token and the job's tenant: a revoked
                # token's stream ends within seconds.
                try:
                    allowed = await anyio.to_thread.run_sync(
                        _still_allowed, settings, job_id, secret, limiter=STREAM_LIMITER)
                except (OperationalError, PoolTimeout, DBAPIError):
                    allowed = True  # the database is away: nothing to stream meanwhile
                checked = time.monotonic()
                if not allowed:
                    yield b'event: error\ndata: {"detail": "token revoked or job gone"}\n\n'
                    return
            try:
                snap = await anyio.to_thread.run_sync(read_snapshot, settings, job_id,
                                                      cursor.metric_id, limiter=STREAM_LIMITER)
            except job_reads.JobNotFound:
                return  # deleted while watched: nothing more will happen to it
            except (OperationalError, PoolTimeout):
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
            await woken.wait(POLL_SECONDS)

    return SlotStream(frames(), give_back, media_type="text/event-stream",
                      headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
