"""For operators: /metrics (Prometheus), the workers (admin), the fleet page's numbers."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from api import metrics
from api.deps import (
    AdminDep,
    SessionDep,
    SettingsDep,
    bearer_secret,
    check_token,
    unauthorized,
)
from api.schemas import FleetOut, QueueOut, WorkerOut
from convoy.queue import gpu_queue, queue_for
from db import job_reads, stats
from db import workers as workers_db
from db.states import JobState
from db.tables import Worker

router = APIRouter(tags=["operations"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "the Prometheus text format"}})
async def scrape(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """Prometheus metrics. Needs an admin token or one with the `metrics` scope, unless
    CONVOY_METRICS_PUBLIC=true."""
    if not settings.metrics_public:
        principal = await check_token(request, bearer_secret(request))
        if principal is None:
            raise unauthorized()
        if not (principal.is_admin or "metrics" in principal.scopes):
            raise HTTPException(403, "/metrics needs an admin token or a token with the "
                                     "`metrics` scope")

    def read() -> bytes:
        try:
            return metrics.render(session, settings)
        finally:
            session.close()

    return Response(await run_in_threadpool(read), media_type=CONTENT_TYPE_LATEST)


def worker_out(w: Worker) -> WorkerOut:
    return WorkerOut.model_validate(w, from_attributes=True)


@router.get("/v1/workers", response_model=list[WorkerOut], tags=["operations"])
def list_workers(session: SessionDep, settings: SettingsDep, admin: AdminDep
                 ) -> list[WorkerOut]:
    """Every worker that reported in the last `worker_seen_seconds` (60 s by default;
    workers report every heartbeat period): host, devices, queues, state, current job."""
    return [worker_out(w) for w in
            workers_db.seen_since(session, within_seconds=settings.worker_seen_seconds)]


@router.get("/v1/fleet", response_model=FleetOut, tags=["operations"])
def fleet(session: SessionDep, settings: SettingsDep, admin: AdminDep) -> FleetOut:
    """The dashboard's fleet page: live workers, each queue with its readers and its queued
    jobs, and every tenant's jobs by state."""
    workers = workers_db.seen_since(session, within_seconds=settings.worker_seen_seconds)
    live = workers_db.live_queues(session, within_seconds=settings.worker_seen_seconds)
    queued: dict[str, int] = {}
    for _, _, device, devices in job_reads.queued_routes(session):
        name = queue_for(settings.queue, device, devices)
        queued[name] = queued.get(name, 0) + 1
    names = sorted({settings.queue, gpu_queue(settings.queue), *live, *queued})
    by_state = stats.jobs_by_state(session)
    return FleetOut(workers=[worker_out(w) for w in workers],
                    queues=[QueueOut(name=n, workers=live.get(n, 0), queued=queued.get(n, 0))
                            for n in names],
                    jobs={s.value: by_state.get(s.value, 0) for s in JobState},
                    worker_seen_seconds=settings.worker_seen_seconds)
