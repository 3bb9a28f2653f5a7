"""Run one job attempt: claim it, do the work, record the outcome. Called by the Celery
task with a job id; also callable directly (tests, benchmarks)."""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from sqlalchemy import select

from convoy import datasets
from convoy.artifacts import (
    CorruptArtifact,
    StoreUnavailable,
    checkpoint_name,
    get_store,
    job_key,
)
from convoy.jobspec import TrainJobRequest
from convoy.settings import Settings
from db import jobs
from db.session import session_scope
from db.tables import Artifact, Job, Upload
from models.build import build_model
from worker import checkpoints, warmup
from worker.dbretry import is_disconnect, retry_db
from worker.lease import SHUTTING_DOWN, JobTimedOut, Lease
from worker.train import DeviceData, EpochReport, NonFiniteLoss, Progress, Stopped, train

log = logging.getLogger(__name__)


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but this worker has no CUDA device")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def note(settings: Settings, job_id: str, message: str) -> None:
    """One info line in the job's log, in its own short transaction: once per attempt, never
    from the training loop."""

    def write() -> None:
        with session_scope(settings.database_url) as session:
            jobs.log(session, job_id=job_id, message=message)

    retry_db(write, what=f"job {job_id} log", within_s=settings.db_retry_seconds)


def load_split(ref: Any, *, settings: Settings, tenant: str) -> datasets.Split:
    if isinstance(ref, datasets.DigitsRef):
        return datasets.load_digits()
    if isinstance(ref, datasets.SyntheticRef):
        return datasets.load_synthetic(ref)
    with session_scope(settings.database_url) as session:
        upload = session.scalars(
            select(Upload).where(Upload.id == ref.id, Upload.tenant == tenant,
                                 Upload.kind == "dataset")
        ).one_or_none()
        if upload is None:
            raise LookupError(f"dataset {ref.id} not found")
        key = upload.key
    data = get_store(settings.artifact_root).get_bytes(key)
    x, y = datasets.parse_npz(data, max_pixels=settings.max_image_pixels)
    return datasets.split_uploaded(x, y)


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, NonFiniteLoss | CorruptArtifact | JobTimedOut):
        return str(exc)
    if isinstance(exc, torch.OutOfMemoryError):
        return ("CUDA out of memory: the model and batch do not fit on this GPU; "
                "try a smaller batch_size")
    return f"{type(exc).__name__}: {exc}"


class TrainRun:
    """One attempt of a train job, from claim to outcome."""

    def __init__(self, settings: Settings, job: Job, worker_id: str) -> None:
        self.settings, self.job, self.worker_id = settings, job, worker_id
        self.store = get_store(settings.artifact_root)
        self.request = TrainJobRequest.model_validate(job.request)
        self.progress = Progress()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self.pending: Future[None] | None = None
        self.lease_lost = False
        self.started = time.monotonic()

    def db(self):  # type: ignore[no-untyped-def]
        return session_scope(self.settings.database_url)

    def checkpoint_rows(self) -> tuple[list[Artifact], dict[str, Artifact]]:
        """The job's model checkpoint rows, newest first, and its optimizer rows by name."""
        with self.db() as session:
            rows = list(session.scalars(
                select(Artifact)
                .where(Artifact.job_id == self.job.id,
                       Artifact.kind.in_(("checkpoint", "optimizer")))
                .order_by(Artifact.name.desc())
            ))
        return ([r for r in rows if r.kind == "checkpoint"],
                {r.name: r for r in rows if r.kind == "optimizer"})

    def on_epoch(self, report: EpochReport) -> None:
        # Snapshot on this thread (tensors copied to CPU now), write on the writer thread:
        # the next epoch trains while the files go to disk.
        meta = {
            "format": 1,
            "job_id": self.job.id,
            "epoch": report.epoch,
            "step": report.step,
            "model": self.request.model.model_dump(mode="json"),
            "train": self.request.train.model_dump(mode="json"),
            "metrics": report.metrics,
        }
        model_blob = checkpoints.model_bytes(report.model, meta)
        optim_blob = checkpoints.optimizer_bytes(report.optimizer)
        self._wait_pending()
        self.pending = self.writer.submit(self._persist_epoch, report.epoch, report.step,
                                          dict(report.metrics), model_blob, optim_blob)

    def _persist_epoch(self, epoch: int, step: int, metrics: dict[str, float],
                       model_blob: bytes, optim_blob: bytes) -> None:
        # Fence: a worker cut off from the database (its lease long expired, the job resumed
        # elsewhere) must not overwrite the new attempt's files when it comes back.
        def holds() -> bool:
            with self.db() as session:
                return jobs.holds_lease(session, job_id=self.job.id, worker_id=self.worker_id)

        if not retry_db(holds, what=f"job {self.job.id} lease check",
                        within_s=self.settings.db_retry_seconds):
            self.lease_lost = True
            return
        name = checkpoint_name(epoch)
        rows: list[Artifact] = []
        try:
            for kind, blob, fname in (("checkpoint", model_blob, name),
                                      ("optimizer", optim_blob,
                                       name.replace(".safetensors", ".optimizer.safetensors"))):
                key = job_key(self.job.id, "checkpoints", fname)
                size, sha = self.store.put_bytes(key, blob)
                rows.append(Artifact(job_id=self.job.id, tenant=self.job.tenant, kind=kind,
                                     name=fname, key=key, size=size, sha256=sha,
                                     meta={"epoch": epoch}))
        except BaseException:
            # No file without its row: the model file written before the optimizer file hit a
            # full store goes too (a row an earlier attempt left for this name then points at
            # nothing, which resume treats as a damaged checkpoint and skips).
            left = self.store.discard(r.key for r in rows)
            if left:
                log.error("job %s: could not remove %s after a failed write", self.job.id, left)
            raise

        def record() -> bool:
            with self.db() as session:
                return jobs.record_epoch(
                    session, job_id=self.job.id, worker_id=self.worker_id, epoch=epoch,
                    step=step, metrics=metrics, progress=epoch / self.request.train.epochs,
                    artifacts=rows,
                )

        if not retry_db(record, what=f"job {self.job.id} epoch {epoch}",
                        within_s=self.settings.db_retry_seconds):
            self.lease_lost = True

    def _wait_pending(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def run(self) -> None:
        # The lease starts before anything slow (a large dataset, a resume, torch.compile),
        # so none of that can outlast it.
        with Lease(db_url=self.settings.database_url, job_id=self.job.id,
                   worker_id=self.worker_id, every_s=self.settings.heartbeat_seconds,
                   progress=self.progress) as lease:
            result = self._train(lease)

        seconds = time.monotonic() - self.started
        resumed = int(result.get("resumed_from_epoch") or 0)
        line = (f"succeeded: {result.get('epochs_done')} epochs in {seconds:.1f} s, "
                f"val_accuracy {result.get('val_accuracy', float('nan')):.4f}"
                + (f" (resumed from epoch {resumed})" if resumed else ""))

        def finish() -> bool:
            with self.db() as session:
                return jobs.finish_job(session, job_id=self.job.id, worker_id=self.worker_id,
                                       state="succeeded", result=result, log_line=line)

        retry_db(finish, what=f"job {self.job.id} outcome",
                 within_s=self.settings.db_retry_seconds)

    def _train(self, lease: Lease) -> dict[str, Any]:
        req = self.request
        device = pick_device(req.device)
        split = load_split(req.dataset, settings=self.settings, tenant=self.job.tenant)
        data = DeviceData.from_numpy(split, device)
        torch.manual_seed(req.train.seed)
        model = build_model(req.model).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        from worker.train import make_optimizer

        optimizer = make_optimizer(model, req.train)
        start_epoch, resumed_metrics = self._resume(model, optimizer, device)
        trained = torch.compile(model) if req.train.compile else model
        try:
            result = train(
                trained, data, req.train, optimizer=optimizer, start_epoch=start_epoch,
                on_epoch=self.on_epoch,
                should_stop=lambda: (lease.should_stop() or self.lease_lost
                                     or SHUTTING_DOWN.is_set()),
                progress=self.progress,
            )
        finally:
            try:
                self._wait_pending()
            finally:
                self.writer.shutdown()
        if lease.should_stop() or self.lease_lost:
            raise Stopped()
        for key in ("train_loss", "train_accuracy"):
            # resumed after the last epoch: nothing was trained in this attempt, so the
            # training figures are the last epoch's, as its checkpoint recorded them
            if key not in result and key in resumed_metrics:
                result[key] = resumed_metrics[key]
        result["device"] = str(device)
        result["resumed_from_epoch"] = start_epoch
        return result

    def _resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device) -> tuple[int, dict[str, float]]:
        """Load the newest intact checkpoint: its model and optimizer files must match their
        rows (size and sha256) and parse. A damaged one is skipped, and the job's log says
        which and why; with none intact the attempt starts over from epoch 0 (the model as
        freshly seeded). Returns (epoch, that epoch's metrics)."""
        models, optimizers = self.checkpoint_rows()
        if not models:
            return 0, {}
        damaged: list[str] = []
        for row in models:
            try:
                epoch, metrics, model_state, optim_state = self._read_checkpoint(
                    row, optimizers, model, device)
            except CorruptArtifact as exc:
                damaged.append(str(exc))
                continue
            try:
                # validates the groups against the parameters before it changes anything
                optimizer.load_state_dict(optim_state)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                damaged.append(f"{row.name.replace('.safetensors', '.optimizer.safetensors')}"
                               f": does not fit the optimizer ({exc})")
                continue
            model.load_state_dict(model_state)  # names and shapes checked: cannot fail
            message = f"attempt {self.job.attempt} resumes from {row.name} (epoch {epoch})"
            if damaged:
                message = f"{'; '.join(damaged)}; resuming from {row.name}. {message}"
            self._log(message, level="warning" if damaged else "info")
            return epoch, metrics
        self._log(f"{'; '.join(damaged)}; no intact checkpoint left: attempt "
                  f"{self.job.attempt} starts over from epoch 0", level="warning")
        return 0, {}

    def _read_checkpoint(self, row: Artifact, optimizers: dict[str, Artifact],
                         model: torch.nn.Module, device: torch.device
                         ) -> tuple[int, dict[str, float], dict[str, Any], dict[str, Any]]:
        """Verify and parse one checkpoint (model and optimizer files), applying nothing:
        CorruptArtifact naming the file when it cannot be used."""
        optim_name = row.name.replace(".safetensors", ".optimizer.safetensors")
        optim_row = optimizers.get(optim_name)
        if optim_row is None:
            raise CorruptArtifact(f"{optim_name}: no row for the optimizer state")
        blob = self.store.get_verified(row.key, name=row.name, size=row.size,
                                       sha256=row.sha256)
        optim_blob = self.store.get_verified(optim_row.key, name=optim_name,
                                             size=optim_row.size, sha256=optim_row.sha256)
        try:
            state = checkpoints.load_model_state(blob)
            checkpoints.check_model_state(state, model)
            meta = checkpoints.read_meta(blob)
            epoch = int(meta["epoch"])
        except Exception as exc:  # noqa: BLE001 - any parse failure: the file is unusable
            raise CorruptArtifact(f"{row.name}: unreadable ({type(exc).__name__}: "
                                  f"{str(exc)[:200]})") from exc
        try:
            optim_state = checkpoints.optimizer_state(optim_blob, device)
        except Exception as exc:  # noqa: BLE001
            raise CorruptArtifact(f"{optim_name}: unreadable ({type(exc).__name__}: "
                                  f"{str(exc)[:200]})") from exc
        return epoch, dict(meta.get("metrics") or {}), state, optim_state

    def _log(self, message: str, level: str = "info") -> None:
        def write() -> None:
            with self.db() as session:
                jobs.log(session, job_id=self.job.id, message=message, level=level)

        retry_db(write, what=f"job {self.job.id} log", within_s=self.settings.db_retry_seconds)


def store_backoff(settings: Settings, attempt: int) -> float:
    """Seconds before the next attempt after a storage error on attempt `attempt`: doubling
    from store_retry_seconds, capped at store_retry_max_seconds."""
    return min(settings.store_retry_seconds * 2 ** max(0, attempt - 1),
               settings.store_retry_max_seconds)


def retry_after_store_error(settings: Settings, *, job_id: str, worker_id: str,
                            exc: StoreUnavailable) -> str:
    """End the attempt with outcome `store_error`; queue the job again ("retry") or fail it
    when its attempts ran out ("failed"); "stopped" when it was canceled meanwhile."""
    def record() -> str:
        with session_scope(settings.database_url) as session:
            attempt = jobs.get_job(session, job_id=job_id).attempt
            return jobs.retry_after_storage_error(
                session, job_id=job_id, worker_id=worker_id, error=str(exc),
                backoff_seconds=store_backoff(settings, attempt))

    return retry_db(record, what=f"job {job_id} storage error",
                    within_s=settings.db_retry_seconds)


def run_job(job_id: str, *, settings: Settings, worker_id: str) -> str:
    """Claim and run one attempt of a job. Returns what happened, for logs and tests."""
    warmup.wait()

    def claim() -> Job | None:
        with session_scope(settings.database_url) as session:
            return jobs.claim_job(session, job_id=job_id, worker_id=worker_id,
                                  max_running=settings.max_running_per_tenant)

    try:
        job = retry_db(claim, what=f"claim of job {job_id}",
                       within_s=settings.db_retry_seconds)
    except jobs.TenantAtLimit as exc:
        log.info("%s; deferred", exc)
        return "deferred"  # the task sends it again after tenant_defer_seconds
    if job is None:
        log.info("job %s not claimable (duplicate message, canceled or running elsewhere)", job_id)
        return "skipped"
    try:
        device = pick_device(str((job.request or {}).get("device") or "auto"))
        note(settings, job_id, f"attempt {job.attempt} started on worker {worker_id}, "
                               f"device {device_text(device)}")
        if job.kind == "train":
            TrainRun(settings, job, worker_id).run()
        elif job.kind == "feature_maps":
            from worker.feature_maps import run_feature_maps

            run_feature_maps(settings, job, worker_id)
        else:
            raise ValueError(f"unknown job kind {job.kind!r}")
    except Stopped:
        def stopped() -> str:
            with session_scope(settings.database_url) as session:
                state = jobs.job_state(session, job_id=job_id)
                if SHUTTING_DOWN.is_set() and state == "running":
                    if jobs.release_job(session, job_id=job_id, worker_id=worker_id):
                        return "released"
                    state = jobs.job_state(session, job_id=job_id)  # a cancel came first
                jobs.end_attempt(session, job_id=job_id, worker_id=worker_id,
                                 outcome="canceled" if state == "canceled" else "lost")
                return "stopped"

        return retry_db(stopped, what=f"job {job_id} stop", within_s=settings.db_retry_seconds)
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
            return "lost"
        log.exception("job %s failed", job_id)
        trace, error = traceback.format_exc(), failure_message(exc)

        def failed() -> None:
            with session_scope(settings.database_url) as session:
                jobs.log(session, job_id=job_id, level="error", message=trace)
                jobs.finish_job(session, job_id=job_id, worker_id=worker_id, state="failed",
                                error=error)

        retry_db(failed, what=f"job {job_id} failure", within_s=settings.db_retry_seconds)
        return "failed"
    return "done"
