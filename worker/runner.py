"""Run one job attempt: claim it, do the work, record the outcome. Called by the Celery
task with a job id; also callable directly (tests, benchmarks)."""

from __future__ import annotations

import logging
import time
import traceback

import torch

from convoy.artifacts import CorruptArtifact, StoreUnavailable
from convoy.settings import Settings
from db import dispatch, job_reads, joblog, jobs
from db.session import session_scope
from db.states import AttemptOutcome, JobState
from db.tables import Job
from models.invariance import NonFiniteMaps
from worker import warmup
from worker.control import RunOutcome, Stopped
from worker.data import device_text, pick_device
from worker.dbretry import is_disconnect, retry_db
from worker.ddp import RankFailed, RankLost, plan
from worker.feature_maps import run_feature_maps
from worker.invariance import run_invariance
from worker.lease import SHUTTING_DOWN, JobTimedOut
from worker.train import NonFiniteLoss
from worker.train_job import TrainRun

log = logging.getLogger(__name__)


def note(settings: Settings, job_id: str, message: str) -> None:
    """One info line in the job's log, in its own short transaction: once per attempt, never
    from the training loop."""

    def write() -> None:
        with session_scope(settings.database_url) as session:
            joblog.log(session, job_id=job_id, message=message)

    retry_db(write, what=f"job {job_id} log", within_s=settings.db_retry_seconds)


def opening(settings: Settings, job: Job, worker_id: str) -> tuple[str, str]:
    """The device a claimed job's attempt runs on, and the line saying so in its log;
    RuntimeError when this worker cannot run it (no CUDA, too few devices)."""
    wanted = str((job.request or {}).get("device") or "auto")
    if (world := dispatch.devices_of(job.request)) > 1 and job.kind == "train":
        ranks = plan(settings, wanted=wanted, world=world)  # never touches CUDA here
        return (f"{ranks.device} x{world}",
                f"attempt {job.attempt} started on worker {worker_id}, {ranks.text()}")
    device = pick_device(wanted)
    return (str(device), f"attempt {job.attempt} started on worker {worker_id}, "
                         f"device {device_text(device)}")


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, NonFiniteLoss | NonFiniteMaps | CorruptArtifact | JobTimedOut
                  | RankFailed):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return ("CUDA out of memory: the model and batch do not fit on this GPU; "
                "try a smaller batch_size")
    return f"{type(exc).__name__}: {exc}"


def store_backoff(settings: Settings, attempt: int) -> float:
    """Seconds before the next attempt after a storage error on attempt `attempt`: doubling
    from store_retry_seconds, capped at store_retry_max_seconds."""
    return min(settings.store_retry_seconds * 2 ** max(0, attempt - 1),
               settings.store_retry_max_seconds)


def retry_after_store_error(settings: Settings, *, job_id: str, worker_id: str,
                            exc: StoreUnavailable) -> RunOutcome:
    """End the attempt with outcome `store_error`; queue the job again (RETRY) or fail it
    when its attempts ran out (FAILED); STOPPED when it was canceled meanwhile."""
    def record() -> RunOutcome:
        with session_scope(settings.database_url) as session:
            attempt = job_reads.get_job(session, job_id=job_id).attempt
            return RunOutcome(jobs.retry_after_storage_error(
                session, job_id=job_id, worker_id=worker_id, error=str(exc),
                backoff_seconds=store_backoff(settings, attempt)).value)

    return retry_db(record, what=f"job {job_id} storage error",
                    within_s=settings.db_retry_seconds)


def run_job(job_id: str, *, settings: Settings, worker_id: str) -> RunOutcome:
    """Claim and run one attempt of a job. Returns what happened, for logs and tests."""
    warmup.wait()

    # The attempt's device and first log line commit with the claim (one transaction fewer
    # per job); a job this worker cannot run fails right after it, as before.
    refused: list[Exception] = []

    def started(job: Job) -> tuple[str, str] | None:
        refused.clear()  # a claim retried through an outage asks again
        try:
            return opening(settings, job, worker_id)
        except Exception as exc:  # noqa: BLE001 - raised below, once the claim is committed
            refused.append(exc)
            return None

    claimed_at = time.monotonic()

    def claim() -> Job | None:
        nonlocal claimed_at
        claimed_at = time.monotonic()  # before the UPDATE that sets heartbeat_at
        with session_scope(settings.database_url) as session:
            return jobs.claim_job(session, job_id=job_id, worker_id=worker_id,
                                  max_running=settings.max_running_per_tenant, started=started)

    try:
        job = retry_db(claim, what=f"claim of job {job_id}",
                       within_s=settings.db_retry_seconds)
    except jobs.TenantAtLimit as exc:
        log.info("%s; deferred", exc)
        return RunOutcome.DEFERRED  # the task sends it again after tenant_defer_seconds
    if job is None:
        log.info("job %s not claimable (duplicate message, canceled or running elsewhere)", job_id)
        return RunOutcome.SKIPPED
    try:
        if refused:
            raise refused[0]
        if job.kind == "train":
            TrainRun(settings, job, worker_id, claimed_at=claimed_at).run()
        elif job.kind == "feature_maps":
            run_feature_maps(settings, job, worker_id)
        elif job.kind == "invariance":
            run_invariance(settings, job, worker_id)
        elif job.kind == "evaluate":
            from worker.evaluate import run_evaluate

            run_evaluate(settings, job, worker_id)
        elif job.kind == "export":
            from worker.export import run_export

            run_export(settings, job, worker_id)
        else:
            raise ValueError(f"unknown job kind {job.kind!r}")
    except Stopped:
        def stopped() -> RunOutcome:
            with session_scope(settings.database_url) as session:
                state = job_reads.job_state(session, job_id=job_id)
                if SHUTTING_DOWN.is_set() and state == JobState.RUNNING:
                    if jobs.release_job(session, job_id=job_id, worker_id=worker_id):
                        return RunOutcome.RELEASED
                    state = job_reads.job_state(session, job_id=job_id)  # a cancel came first
                # a sweep trial's pruner ends its job succeeded (db.jobs.prune_job)
                outcome = {JobState.CANCELED: AttemptOutcome.CANCELED,
                           JobState.SUCCEEDED: AttemptOutcome.SUCCEEDED}.get(
                               JobState(state) if state else JobState.RUNNING,
                               AttemptOutcome.LOST)
                jobs.end_attempt(session, job_id=job_id, worker_id=worker_id, outcome=outcome)
                return RunOutcome.STOPPED

        return retry_db(stopped, what=f"job {job_id} stop", within_s=settings.db_retry_seconds)
    except RankLost as exc:
        # A rank died without an error of its own (killed, out of memory): like a worker
        # dying, so the job is queued again at once and resumes from its last checkpoint.
        log.warning("job %s: %s", job_id, exc)
        lost = str(exc)

        def requeue() -> RunOutcome:
            with session_scope(settings.database_url) as session:
                done = jobs.retry_after_storage_error(
                    session, job_id=job_id, worker_id=worker_id, error=lost,
                    backoff_seconds=0, outcome=AttemptOutcome.RANK_FAILED, cause="a lost rank")
            return {jobs.StorageRetry.RETRY: RunOutcome.REQUEUED,
                    jobs.StorageRetry.FAILED: RunOutcome.FAILED}.get(done, RunOutcome.STOPPED)

        return retry_db(requeue, what=f"job {job_id} lost rank",
                        within_s=settings.db_retry_seconds)
    except StoreUnavailable as exc:
        # Full, read-only, unwritable store: not the job's fault. The attempt ends, and the job
        # is queued again after a backoff (failed only when its attempts run out).
        log.warning("job %s: %s", job_id, exc)
        return retry_after_store_error(settings, job_id=job_id, worker_id=worker_id, exc=exc)
    except Exception as exc:
        if is_disconnect(exc):
            # The database stayed away longer than db_retry_seconds: not the job's fault. Leave
            # it running without heartbeats; its lease expires and a later attempt resumes it.
            log.error("job %s: database unreachable, leaving it to its lease", job_id,
                      exc_info=True)
            return RunOutcome.LOST
        log.exception("job %s failed", job_id)
        trace, error = traceback.format_exc(), failure_message(exc)

        def failed() -> None:
            with session_scope(settings.database_url) as session:
                joblog.log(session, job_id=job_id, level="error", message=trace)
                jobs.finish_job(session, job_id=job_id, worker_id=worker_id, state=JobState.FAILED,
                                error=error)

        retry_db(failed, what=f"job {job_id} failure", within_s=settings.db_retry_seconds)
        return RunOutcome.FAILED
    return RunOutcome.DONE
