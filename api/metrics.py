"""Prometheus metrics. Every job, attempt, worker and webhook figure is read from the
database at scrape time, so any API process answers the same and counts what every worker
did (no multiprocess bookkeeping). Only the request-duration histogram is the answering
process's own; with several API processes set PROMETHEUS_MULTIPROC_DIR (prometheus-client's
multiprocess mode) and each scrape sums every process's. docs/operations.md."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy.orm import Session
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import waiting
from convoy.settings import Settings
from db import attempts, job_reads, stats, webhooks
from db import workers as workers_db
from db.states import JobState

# From 0.1 s to a day.
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200,
                    14400, 43200, 86400)
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"}
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

HTTP_REGISTRY = CollectorRegistry(auto_describe=True)
HTTP_DURATION = Histogram(
    "convoy_http_request_duration_seconds",
    "Time from a request's arrival to its answer's end, by route template (never a raw "
    "path), method and status.",
    ["route", "method", "status"], registry=HTTP_REGISTRY)


def route_of(app: FastAPI, scope: Scope) -> str:
    """The route template that answered (`/v1/jobs/{job_id}`), or the one the path would
    have reached (a request turned away before routing), or `unmatched`."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    return _template(app.router.routes, scope) or "unmatched"


def _template(routes: Sequence[object], scope: Scope) -> str | None:
    """The template of the first route the path matches. FastAPI (0.16x) keeps each
    included router as one entry that "matches" any path: look inside it instead."""
    for candidate in routes:
        inner = getattr(getattr(candidate, "original_router", None), "routes", None)
        if inner is not None:
            found = _template(inner, scope)
            if found:
                return found
            continue
        matches = getattr(candidate, "matches", None)
        if matches is None:
            continue
        match, _ = matches(scope)
        if match != Match.NONE:
            path = getattr(candidate, "path", None)
            return path if isinstance(path, str) else None
    return None


class HttpMetrics:
    """Times every HTTP request (outermost middleware: a 413 or 415 counts too)."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app, self.api = app, api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [500]

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            HTTP_DURATION.labels(route_of(self.api, scope), method, str(status[0])).observe(
                time.perf_counter() - t0)


def _histogram(name: str, doc: str, h: stats.Histogram) -> HistogramMetricFamily:
    buckets = [(repr(float(b)), n) for b, n in zip(DURATION_BUCKETS, h.buckets, strict=True)]
    buckets.append(("+Inf", h.count))
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum)


class DatabaseCollector(Collector):
    """The database-derived families, read once per scrape."""

    def __init__(self, session: Session, settings: Settings) -> None:
        self.session, self.settings = session, settings

    def collect(self) -> Iterator[Metric]:
        s, settings = self.session, self.settings
        submitted = CounterMetricFamily("convoy_jobs_submitted", "Jobs submitted, by kind.",
                                        labels=["kind"])
        for kind, n in sorted(stats.submitted_by_kind(s).items()):
            submitted.add_metric([kind], n)
        yield submitted
        finished = CounterMetricFamily("convoy_jobs_finished", "Jobs that ended, by kind and "
                                       "final state.", labels=["kind", "state"])
        for (kind, state), n in sorted(stats.finished_by_kind_state(s).items()):
            finished.add_metric([kind, state], n)
        yield finished
        by_state = stats.jobs_by_state(s)
        jobs = GaugeMetricFamily("convoy_jobs", "Jobs in each state now.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state.value], by_state.get(state.value, 0))
        yield jobs
        yield _histogram("convoy_queue_wait_seconds", "From submission to the first claim by "
                         "a worker, for every job that started.",
                         stats.queue_wait(s, DURATION_BUCKETS))
        yield _histogram("convoy_job_run_seconds", "From the first claim to the end, for every "
                         "job that started and ended.", stats.run_time(s, DURATION_BUCKETS))
        lost = CounterMetricFamily("convoy_attempts_lost", "Attempts whose worker went away "
                                   "(lost, or its lease expired).")
        lost.add_metric([], attempts.lost_count(s))
        yield lost
        workers = GaugeMetricFamily("convoy_workers", "Live workers (seen within "
                                    "worker_seen_seconds) reading each queue.", labels=["queue"])
        live = workers_db.live_queues(s, within_seconds=settings.worker_seen_seconds)
        for queue, n in sorted(live.items()):
            workers.add_metric([queue], n)
        yield workers
        reasons = waiting.reasons(s, settings, job_reads.queued_routes(s))
        counts: dict[str, int] = {}
        for why in reasons.values():
            for code, _ in why:
                counts[code] = counts.get(code, 0) + 1
        waiting_jobs = GaugeMetricFamily("convoy_jobs_waiting", "Queued jobs that cannot start "
                                         "now, by reason.", labels=["reason"])
        for code in (waiting.NO_WORKER, waiting.NO_GPU_WORKER, waiting.TOO_FEW_DEVICES,
                     waiting.TENANT_LIMIT):
            waiting_jobs.add_metric([code], counts.get(code, 0))
        yield waiting_jobs
        failed = CounterMetricFamily("convoy_webhook_deliveries_failed", "Webhook deliveries "
                                     "that ended without a 2xx (retries spent, or a 410).")
        failed.add_metric([], webhooks.failed_count(s))
        yield failed
        pending = GaugeMetricFamily("convoy_webhook_deliveries_pending", "Webhook deliveries "
                                    "waiting to be sent or retried.")
        pending.add_metric([], webhooks.pending_count(s))
        yield pending


def render(session: Session, settings: Settings) -> bytes:
    """The whole exposition: the database's families, then the request histogram (this
    process's, or every process's in multiprocess mode)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session, settings))
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(HTTP_DURATION)
    return generate_latest(registry)
