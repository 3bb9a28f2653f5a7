"""Why a queued job is not starting: computed when it is read, from the workers table (who
reads which queue, seen lately), the tenant's running count and the device it asks for."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.orm import Session

from convoy.queue import queue_for
from convoy.settings import Settings
from db import job_reads
from db import workers as workers_db

# reason codes (the `reason` label of convoy_jobs_waiting in /metrics)
NO_WORKER = "no_worker"
NO_GPU_WORKER = "no_gpu_worker"
TENANT_LIMIT = "tenant_limit"
# A job asking for N devices waits in the N-device queue (convoy.queue.devices_queue), read
# only by workers owning at least N: no live reader means no live worker owns that many.
TOO_FEW_DEVICES = "more_devices_than_any_worker"


def most_devices(live: dict[str, int], base: str) -> int:
    """The most devices a live worker reading `base` (the main or GPU queue) owns, read from
    the device-count queues it reads (base-x2, base-x3...); 0 when none reads `base`."""
    if not live.get(base):
        return 0
    counts = [int(q[len(base) + 2:]) for q in live
              if q.startswith(f"{base}-x") and q[len(base) + 2:].isdigit()]
    return max([1, *counts])


def reasons(session: Session, settings: Settings,
            jobs: Sequence[tuple[str, str, str | None, int]]
            ) -> dict[str, list[tuple[str, str]]]:
    """job id -> [(code, message)] for each of `jobs` (id, tenant, device asked for, device
    count) that cannot start now; jobs that can are left out."""
    if not jobs:
        return {}
    live = workers_db.live_queues(session, within_seconds=settings.worker_seen_seconds)
    running = job_reads.running_counts(session, tenants=[t for _, t, _, _ in jobs])
    window = f"{settings.worker_seen_seconds:g} s"
    found: dict[str, list[tuple[str, str]]] = {}
    for job_id, tenant, device, devices in jobs:
        why: list[tuple[str, str]] = []
        queue = queue_for(settings.queue, device, devices)
        base = queue_for(settings.queue, device)
        if not live.get(queue):
            if devices > 1 and live.get(base):
                why.append((TOO_FEW_DEVICES, f"it asks for {devices} devices and no live worker "
                                             f"owns that many (the most: "
                                             f"{most_devices(live, base)}); it starts when a "
                                             f"worker owning {devices} reads {queue}"))
            elif device == "cuda":
                why.append((NO_GPU_WORKER, f"it asks for device cuda and no live worker reads "
                                           f"the GPU queue {queue} (no GPU worker seen in the "
                                           f"last {window})"))
            else:
                why.append((NO_WORKER, f"no live worker reads its queue {queue} (none seen in "
                                       f"the last {window})"))
        if running.get(tenant, 0) >= settings.max_running_per_tenant:
            why.append((TENANT_LIMIT, f"its tenant is at its running limit ({running[tenant]} "
                                      f"running, max_running_per_tenant="
                                      f"{settings.max_running_per_tenant})"))
        if why:
            found[job_id] = why
    return found


def reason_text(why: list[tuple[str, str]] | None) -> str | None:
    return "; ".join(message for _, message in why) if why else None
