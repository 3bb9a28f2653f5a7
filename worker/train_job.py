"""One attempt of a train job, from claim to outcome: the dataset on the device, resume
from the newest intact checkpoint, the training loop, checkpoints written off the training
thread, and the success recorded by the lease holder."""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, cast

import torch
from sqlalchemy.orm import Session
from torch.nn.parallel import DistributedDataParallel

from convoy.artifacts import CorruptArtifact, checkpoint_name, get_store, job_key
from convoy.jobspec import CheckpointEvery, InitPlan, TrainConfig, TrainJobRequest, TrainJobSource
from convoy.retention import decide
from convoy.settings import Settings
from db import artifacts, joblog, jobs, leases
from db.session import session_scope
from db.states import JobState
from db.tables import Artifact, Job
from models.build import build_model
from models.capture import channels_last
from worker import checkpoints
from worker.control import Progress, Stopped
from worker.data import load_split, pick_device
from worker.dbretry import is_disconnect, retry_db
from worker.ddp import Ranks, plan
from worker.lease import SHUTTING_DOWN, Lease
from worker.shard import Shard
from worker.train import DeviceData, EpochReport, make_optimizer, seed_torch, train

log = logging.getLogger(__name__)

RETAINED = ("val_accuracy", "val_loss", "train_accuracy", "train_loss")
EPOCH_NAME = re.compile(r"^epoch-(\d+)(?:\.optimizer)?\.safetensors$")


def row_epoch(row: Artifact) -> int | None:
    epoch = (row.meta or {}).get("epoch")
    if isinstance(epoch, int):
        return epoch
    found = EPOCH_NAME.match(row.name)
    return int(found.group(1)) if found else None


@dataclass
class Finished:
    """An epoch this attempt finished: what its record and its checkpoint are made of."""

    epoch: int
    step: int
    metrics: dict[str, float]
    snapshot: checkpoints.Snapshot


class TrainRun:
    """One attempt of a train job, from claim to outcome."""

    def __init__(self, settings: Settings, job: Job, worker_id: str, *,
                 shard: Shard | None = None, claimed_at: float = -math.inf) -> None:
        # shard: this is one rank of a multi-device attempt (worker/rank.py), not its parent
        self.settings, self.job, self.worker_id, self.shard = settings, job, worker_id, shard
        # monotonic time just before the newest write that renewed the lease (the claim,
        # an epoch's record; the lease thread's heartbeats count too): see _fresh
        self.renewed_at = claimed_at
        self.lease: Lease | None = None
        self.store = get_store(settings)
        self.request = TrainJobRequest.model_validate(job.request)
        init = (job.summary or {}).get("init")
        self.init = InitPlan.model_validate(init) if init else None
        # a continued job numbers its epochs on from its source's: train.epochs more
        self.offset = self.init.epoch if self.init and self.init.continued else 0
        self.cfg: TrainConfig = self.request.train.model_copy(
            update={"epochs": self.offset + self.request.train.epochs})
        self.progress = Progress()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt")
        self.pending: Future[None] | None = None
        self.lease_lost = False
        self.every = self.request.checkpoint_every or CheckpointEvery(
            epochs=settings.checkpoint_every_epochs,
            min_seconds=settings.checkpoint_min_seconds)
        # the cadence's last checkpoint (epoch, monotonic time), set again when training starts
        self.ckpt_epoch, self.ckpt_at = 0, time.monotonic()
        # Finished epochs no record has been sent for yet (on_epoch: short epochs are
        # recorded together, at most every epoch_record_seconds), and when the last was sent.
        # A multi-device attempt records each epoch: its ranks are killed on a stop.
        self.unrecorded: list[jobs.EpochPoints] = []
        self.recorded_at = time.monotonic()
        self.record_every_s = settings.epoch_record_seconds if shard is None else 0.0
        self.written = 0  # the newest epoch whose checkpoint this attempt has (or resumed)
        self.checkpointed: set[int] = set()  # the epochs whose files this attempt wrote
        self.latest: Finished | None = None  # the last epoch this attempt finished
        self.last: Finished | None = None  # the job's last epoch, to record with the outcome
        # whether _prune has looked for an earlier attempt's leftover files (a first attempt
        # has none to look for)
        self.swept = job.attempt <= 1
        self.started = time.monotonic()

    def db(self) -> AbstractContextManager[Session]:
        return session_scope(self.settings.database_url)

    def checkpoint_rows(self) -> tuple[list[Artifact], dict[str, Artifact]]:
        """The job's model checkpoint rows, newest first, and its optimizer rows by name."""
        with self.db() as session:
            rows = artifacts.resume_candidates(session, job_id=self.job.id)
        return ([r for r in rows if r.kind == "checkpoint"],
                {r.name: r for r in rows if r.kind == "optimizer"})

    def on_epoch(self, report: EpochReport) -> None:
        # Snapshot on this thread (tensors cloned now, so the next epoch's steps cannot change
        # them), serialise, hash and write on the writer thread while the next epoch trains.
        # Every epoch records its metrics and progress; a checkpoint only when the cadence
        # (checkpoint_every) says so, and always at the last epoch.
        model = report.model
        if isinstance(model, DistributedDataParallel):  # the same tensor names as on one device
            model = model.module
        now = time.monotonic()
        due = report.epoch >= self.cfg.epochs or (
            report.epoch - self.ckpt_epoch >= self.every.epochs
            and now - self.ckpt_at >= self.every.min_seconds)
        # The last epoch of a one-device attempt is written by run() with the outcome, in
        # one transaction (_succeed): nothing trains after it, so its tensors need no copy.
        last = report.epoch >= self.cfg.epochs and self.shard is None
        done = Finished(report.epoch, report.step, dict(report.metrics),
                        checkpoints.snapshot(model, report.optimizer, copy=not last))
        self._wait_pending()
        self.latest = done  # what a cancel or warm shutdown checkpoints if no one did
        if last:
            self.last = done
            return
        if not due and now - self.recorded_at < self.record_every_s:
            # Recorded with the next record (or the outcome, or the stop): one transaction
            # for several short epochs instead of one each, whose work on the writer thread
            # slows the training steps beside it (bench/RESULTS.md, issue 22).
            self.unrecorded.append(jobs.EpochPoints(done.epoch, done.step, done.metrics))
            return
        if due:
            self.ckpt_epoch, self.ckpt_at = report.epoch, now
        earlier, self.unrecorded = self.unrecorded, []
        self.recorded_at = now
        self.pending = self.writer.submit(self._persist_epoch, done, due, earlier)

    def _fresh(self) -> bool:
        """Whether this attempt renewed its lease less than half a lease ago (monotonic
        clock, taken before the renewing write was sent). Then no other attempt can hold
        the job: only an expired lease lets another worker claim it (every other way back to
        queued is this worker's own write), so a checkpoint's files need no lease check
        before they are written. Clocks may disagree by up to half a lease."""
        heartbeat = self.lease.renewed_at if self.lease is not None else None
        renewed = max(self.renewed_at, heartbeat if heartbeat is not None else -math.inf)
        return time.monotonic() - renewed < self.settings.lease_seconds / 2

    def _may_write_files(self) -> bool:
        """The fence of a checkpoint's files: a renewal fresh enough (_fresh), else a lease
        check in the database."""
        return self._fresh() or self._holds()

    def _holds(self) -> bool:
        def holds() -> bool:
            with self.db() as session:
                return leases.holds_lease(session, job_id=self.job.id, worker_id=self.worker_id)

        return retry_db(holds, what=f"job {self.job.id} lease check",
                        within_s=self.settings.db_retry_seconds)

    def _write_files(self, done: Finished) -> list[Artifact]:
        """The epoch's model and optimizer files (serialised and hashed here, on the writer
        thread), and their rows, not yet committed."""
        meta = {
            "format": 1,
            "job_id": self.job.id,
            "epoch": done.epoch,
            "step": done.step,
            "model": self.request.model.model_dump(mode="json"),
            "train": self.cfg.model_dump(mode="json"),
            "metrics": done.metrics,
        }
        model_blob, optim_blob = checkpoints.snapshot_bytes(done.snapshot, meta)
        name = checkpoint_name(done.epoch)
        rows: list[Artifact] = []
        # the metrics retention ranks by ride in the rows (finite values only: JSON)
        kept_metrics = {k: float(done.metrics[k]) for k in RETAINED
                        if k in done.metrics and math.isfinite(float(done.metrics[k]))}
        try:
            for kind, blob, fname in (("checkpoint", model_blob, name),
                                      ("optimizer", optim_blob,
                                       name.replace(".safetensors", ".optimizer.safetensors"))):
                key = job_key(self.job.id, "checkpoints", fname)
                size, sha = self.store.put_bytes(key, blob)
                rows.append(Artifact(job_id=self.job.id, tenant=self.job.tenant, kind=kind,
                                     name=fname, key=key, size=size, sha256=sha,
                                     meta={"epoch": done.epoch, "metrics": kept_metrics}))
            self.checkpointed.add(done.epoch)
        except BaseException:
            # No file without its row: the model file written before the optimizer file hit a
            # full store goes too (a row an earlier attempt left for this name then points at
            # nothing, which resume treats as a damaged checkpoint and skips).
            self._discard([r.key for r in rows])
            raise
        return rows

    def _discard(self, keys: list[str]) -> None:
        left = self.store.discard(keys)
        if left:
            log.error("job %s: could not remove %s after a failed write", self.job.id, left)

    def _persist_epoch(self, done: Finished, checkpoint: bool,
                       earlier: Sequence[jobs.EpochPoints] = ()) -> None:
        rows: list[Artifact] = []
        if checkpoint:
            # Fence: a worker cut off from the database (its lease long expired, the job
            # resumed elsewhere) must not overwrite the new attempt's files when it comes
            # back (its renewals failed meanwhile, so it checks in the database). An epoch
            # without files needs no check: record_epoch's UPDATE is the fence.
            if not self._may_write_files():
                self.lease_lost = True
                return
            rows = self._write_files(done)
        progress = (done.epoch - self.offset) / self.request.train.epochs
        sent = time.monotonic()
        recorded, dropped = self._record(
            f"epoch {done.epoch}", lambda session, retain: jobs.record_epoch(
                session, job_id=self.job.id, worker_id=self.worker_id, epoch=done.epoch,
                step=done.step, metrics=done.metrics, progress=progress, artifacts=rows,
                before_commit=retain if rows else None, earlier=earlier))
        if not recorded:
            self.lease_lost = True
            return
        self.renewed_at = max(self.renewed_at, sent)  # its UPDATE set heartbeat_at
        if rows:
            self.written = done.epoch
            self._prune(dropped)

    def _unrecorded_before(self, epoch: int) -> list[jobs.EpochPoints]:
        return [p for p in self.unrecorded if p.epoch < epoch]

    def _record_unrecorded(self) -> None:
        """On a failure: the finished epochs not yet recorded, recorded now (the job is
        still running under this attempt), before the failure is; nothing when the fence
        refuses. Never raises: the failure goes on to be recorded."""
        if not self.unrecorded:
            return
        *earlier, newest = self.unrecorded
        progress = (newest.epoch - self.offset) / self.request.train.epochs
        try:
            recorded, _ = self._record(
                "unrecorded epochs", lambda session, _retain: jobs.record_epoch(
                    session, job_id=self.job.id, worker_id=self.worker_id,
                    epoch=newest.epoch, step=newest.step, metrics=newest.metrics,
                    progress=progress, earlier=earlier))
            if recorded:
                self.unrecorded = []
        except Exception:  # noqa: BLE001 - the failure is what the job must record
            log.warning("job %s: the epochs before the failure were not recorded",
                        self.job.id, exc_info=True)

    def _stop_checkpoint(self) -> None:
        """On a cancel, a warm shutdown or a timeout: the checkpoint of the last finished
        epoch, when the cadence skipped it (or its record came after the cancel), so the
        work of no finished epoch is lost. Written only while the job is still this
        attempt's, running or canceled (db.jobs.stop_fence)."""
        done = self.latest
        if done is None or done.epoch <= self.written:
            return

        def may() -> bool:
            with self.db() as session:
                return jobs.may_write_stop_checkpoint(
                    session, job_id=self.job.id, worker_id=self.worker_id,
                    attempt=self.job.attempt)

        if not retry_db(may, what=f"job {self.job.id} stop check",
                        within_s=self.settings.db_retry_seconds):
            return
        rows = self._write_files(done)
        earlier = self._unrecorded_before(done.epoch)
        recorded, dropped = self._record(
            "stop checkpoint", lambda session, retain: jobs.record_stop_checkpoint(
                session, job_id=self.job.id, worker_id=self.worker_id,
                attempt=self.job.attempt, epoch=done.epoch, step=done.step,
                metrics=done.metrics, artifacts=rows, before_commit=retain, earlier=earlier))
        if not recorded:
            self._discard([r.key for r in rows])
            return
        self.unrecorded = []
        self.written = done.epoch
        self._log(f"attempt {self.job.attempt} stopping: wrote {rows[0].name}, the "
                  f"checkpoint of its last finished epoch ({done.epoch})")
        self._prune(dropped)

    def _record(self, what: str,
                write: Callable[[Session, Callable[[Session], None]], bool]
                ) -> tuple[bool, list[str]]:
        """One epoch transaction, retried through a database outage: `write(session, retain)`
        with `retain` the retention decision to run before its commit. Returns whether it was
        recorded, and the keys of the files the committed decision dropped."""
        dropped: list[str] = []

        def retain(session: Session) -> None:
            dropped.extend(self._retain(session))

        def attempt() -> bool:
            dropped.clear()
            with self.db() as session:
                return write(session, retain)

        recorded = retry_db(attempt, what=f"job {self.job.id} {what}",
                            within_s=self.settings.db_retry_seconds)
        return recorded, dropped

    def _retain(self, session: Session) -> list[str]:
        """The retention decision, in the epoch's transaction: delete the rows of the
        checkpoints (and optimizer states) the policy drops; their keys, to remove after the
        commit."""
        policy = self.request.checkpoints
        if policy.keep_last is None:
            return []
        if self.job.attempt <= 1 and len(self.checkpointed) <= policy.keep_last:
            # A first attempt's checkpoints are all its own (every way back to the queue
            # raises the attempt): no more of them than keep_last, so all stay. No read.
            return []
        rows = artifacts.resume_index(session, job_id=self.job.id)
        models = {e: r for r in rows if r.kind == "checkpoint"
                  and (e := row_epoch(r)) is not None}
        scores: dict[int, float | None] = {
            e: ((r.meta or {}).get("metrics") or {}).get(policy.metric) for e, r in models.items()}
        kept = decide(scores, policy)
        drop = [r for e, r in models.items() if e not in kept.models]
        drop += [r for r in rows if r.kind == "optimizer"
                 and (e := row_epoch(r)) is not None and e not in kept.optimizers]
        artifacts.delete_ids(session, [r.id for r in drop])
        return [r.key for r in drop]

    def _prune(self, dropped: list[str]) -> None:
        """Remove the files the committed decision dropped, and any checkpoint file of the
        job no row lists (left by an attempt killed between its decision and its deletes)."""
        if self.request.checkpoints.keep_last is None:
            return
        if self.settings.checkpoint_prune_delay_seconds:
            time.sleep(self.settings.checkpoint_prune_delay_seconds)
        orphans: list[str] = []
        if not self.swept:
            # once per attempt: an earlier attempt's leftovers (this attempt removes what
            # its own decisions drop right after each commit)
            self.swept = True
            with self.db() as session:
                listed = {r.key for r in artifacts.resume_index(session, job_id=self.job.id)}
            prefix = job_key(self.job.id, "checkpoints") + "/"
            orphans = [k for k, _ in self.store.list_keys(prefix) if k not in listed]
        left = self.store.discard([*dropped, *orphans])
        if left:
            log.warning("job %s: could not remove dropped checkpoints %s", self.job.id, left)

    def _wait_pending(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def run(self) -> None:
        # The lease starts before anything slow (a large dataset, a resume, torch.compile),
        # so none of that can outlast it; it is renewed until the outcome is recorded (the
        # last checkpoint of a large model may take long to upload).
        with Lease(db_url=self.settings.database_url, job_id=self.job.id,
                   worker_id=self.worker_id, every_s=self.settings.heartbeat_seconds,
                   progress=self.progress) as lease:
            self.lease = lease
            devices = self.request.resources.devices
            try:
                result = self._train(lease) if devices == 1 else self._run_ranks(lease)
                result["world_size"] = devices
                if self.last is not None:
                    self._succeed(self.last, result, self._success_line(result))
                    return
            except Stopped:
                raise
            except Exception as exc:
                if not is_disconnect(exc):  # (the database away: left to the lease)
                    self._record_unrecorded()  # the finished epochs' points, then the failure
                raise

        line = self._success_line(result)

        def finish() -> bool:
            with self.db() as session:
                return jobs.finish_job(session, job_id=self.job.id, worker_id=self.worker_id,
                                       state=JobState.SUCCEEDED, result=result, log_line=line)

        retry_db(finish, what=f"job {self.job.id} outcome",
                 within_s=self.settings.db_retry_seconds)

    def _success_line(self, result: dict[str, Any]) -> str:
        seconds = time.monotonic() - self.started
        resumed = int(result.get("resumed_from_epoch") or 0)
        return (f"succeeded: {result.get('epochs_done')} epochs in {seconds:.1f} s, "
                f"val_accuracy {result.get('val_accuracy', float('nan')):.4f}"
                + (f" (resumed from epoch {resumed})" if resumed else ""))

    def _succeed(self, done: Finished, result: dict[str, Any], line: str) -> None:
        """The last epoch's checkpoint, its record and the job's success: the files (after
        the fence of every checkpoint's files, _may_write_files), then one transaction
        (db.jobs.succeed_with_last_epoch). When the job is no longer this attempt's
        (canceled, pruned or lost meanwhile), Stopped, after the stop checkpoint a canceled
        attempt may still write, as when the last epoch's record is refused."""
        if self._may_write_files():
            rows = self._write_files(done)
            earlier = self._unrecorded_before(done.epoch)
            recorded, dropped = self._record(
                "last epoch and outcome", lambda session, retain: jobs.succeed_with_last_epoch(
                    session, job_id=self.job.id, worker_id=self.worker_id, epoch=done.epoch,
                    step=done.step, metrics=done.metrics, artifacts=rows, result=result,
                    log_line=line, before_commit=retain, earlier=earlier))
            if recorded:
                self.unrecorded = []
                self.written = done.epoch
                self._prune(dropped)
                return
        self.lease_lost = True
        try:
            self._stop_checkpoint()
        except Exception:  # noqa: BLE001 - the stop goes on; the older checkpoints stay
            log.warning("job %s: no checkpoint of the last finished epoch", self.job.id,
                        exc_info=True)
        raise Stopped()

    def _run_ranks(self, lease: Lease) -> dict[str, Any]:
        """A multi-device attempt: this process keeps the lease while the ranks train (rank 0
        writing checkpoints and metrics through on_epoch, as below); cancel, a lost lease or a
        warm shutdown kill every rank."""
        ranks = Ranks(self.settings, job_id=self.job.id, worker_id=self.worker_id,
                      plan=plan(self.settings, wanted=self.request.device,
                                world=self.request.resources.devices))
        result = ranks.run(progress=self.progress,
                           should_stop=lambda: lease.should_stop() or SHUTTING_DOWN.is_set())
        if lease.should_stop():
            raise Stopped()
        return result

    def train_rank(self, device: torch.device) -> dict[str, Any]:
        """This rank's part of a multi-device attempt (worker/rank.py): no lease here, the
        parent holds it and kills the ranks when it is lost."""
        return self._train(None, device)

    def _train(self, lease: Lease | None, device: torch.device | None = None
               ) -> dict[str, Any]:
        req = self.request
        shard = self.shard
        device = device or pick_device(req.device)
        split = load_split(req.dataset, settings=self.settings, tenant=self.job.tenant)
        data = DeviceData.from_numpy(split, device)
        seed_torch(req.train.seed, device)
        model: torch.nn.Module = build_model(req.model).to(device)
        if shard is not None and req.resources.sync_batch_norm:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if device.type == "cuda":
            model = channels_last(model)
            torch.backends.cudnn.benchmark = True
        optimizer = make_optimizer(model, self.cfg)
        # every rank loads the same checkpoint (the checkpoint does not depend on N)
        start_epoch, resumed_metrics = self._resume(model, optimizer, device)
        if start_epoch == 0 and self.init is not None:
            start_epoch = self._init_from(self.init, model, optimizer, device)
        if shard is not None:
            model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        # torch.compile returns the module wrapped (an nn.Module); its stubs say Callable
        trained = cast(torch.nn.Module, torch.compile(model)) if req.train.compile else model
        writes = shard is None or shard.rank == 0
        self.ckpt_epoch = self.written = start_epoch
        self.ckpt_at = time.monotonic()
        stopped = False
        try:
            result = train(
                trained, data, self.cfg, optimizer=optimizer, start_epoch=start_epoch,
                on_epoch=self.on_epoch if writes else None,
                should_stop=lambda: ((lease is not None and lease.should_stop())
                                     or self.lease_lost or SHUTTING_DOWN.is_set()),
                progress=self.progress, shard=shard,
            )
        except Stopped:
            stopped = True
            raise
        finally:
            try:
                self._wait_pending()
            finally:
                self.writer.shutdown()
            if stopped and writes:
                try:
                    self._stop_checkpoint()
                except Exception:  # noqa: BLE001 - the stop goes on; the older checkpoints stay
                    log.warning("job %s: no checkpoint of the last finished epoch",
                                self.job.id, exc_info=True)
        if (lease is not None and lease.should_stop()) or self.lease_lost:
            raise Stopped()
        for key in ("train_loss", "train_accuracy"):
            # resumed after the last epoch: nothing was trained in this attempt, so the
            # training figures are the last epoch's, as its checkpoint recorded them
            if key not in result and key in resumed_metrics:
                result[key] = resumed_metrics[key]
        result["device"] = str(device)
        result["resumed_from_epoch"] = start_epoch
        result["checkpoint_every"] = self.every.model_dump()
        return result

    def _resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device) -> tuple[int, dict[str, float]]:
        """Load the newest intact checkpoint: its model and optimizer files must match their
        rows (size and sha256) and parse. A damaged one is skipped, and the job's log says
        which and why; with none intact the attempt starts over from epoch 0 (the model as
        freshly seeded). Returns (epoch, that epoch's metrics).

        A first attempt has nothing to resume from and skips the lookup (a round trip of
        every short job): every way back to queued (lease expiry, release, a storage retry,
        a lost rank) raises the attempt, so only this attempt could have written rows."""
        if self.job.attempt <= 1:
            return 0, {}
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

    def _init_from(self, init: InitPlan, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, device: torch.device) -> int:
        """Load the source checkpoint the API resolved (verified against its row): the
        tensors it named, and for a continued job the optimizer state too. Returns the epoch
        training starts from (the source's when continued, else 0)."""
        from worker.feature_maps import source_row

        with self.db() as session:
            row, what = source_row(session, self.job, init.source)
            optim_row = None
            if init.continued and isinstance(init.source, TrainJobSource):
                optim_row = artifacts.find(
                    session, job_id=init.source.job_id, tenant=self.job.tenant,
                    kind="optimizer",
                    name=init.source.checkpoint.replace(".safetensors",
                                                        ".optimizer.safetensors"))
                if optim_row is None:
                    raise CorruptArtifact(f"{what}: its optimizer state is gone; cannot "
                                          "continue")
        blob = self.store.get_verified(row.key, name=what, size=row.size, sha256=row.sha256)
        source = checkpoints.load_model_state(blob)
        state = model.state_dict()
        for name in init.loaded:
            state[name] = source[name].to(state[name].device, state[name].dtype)
        model.load_state_dict(state)
        message = f"starts from {what}: {len(init.loaded)} tensors loaded"
        if init.skipped:
            message += f", {len(init.skipped)} left as seeded ({', '.join(init.skipped[:8])})"
        if optim_row is not None:
            optim_blob = self.store.get_verified(
                optim_row.key, name=optim_row.name, size=optim_row.size,
                sha256=optim_row.sha256)
            optimizer.load_state_dict(checkpoints.optimizer_state(optim_blob, device))
            message += f"; optimizer state restored, epochs numbered on from {init.epoch}"
        self._log(message)
        return init.epoch if init.continued else 0

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
        if self.shard is not None and self.shard.rank != 0:
            return  # one line per attempt, not one per rank
        def write() -> None:
            with self.db() as session:
                joblog.log(session, job_id=self.job.id, message=message, level=level)

        retry_db(write, what=f"job {self.job.id} log", within_s=self.settings.db_retry_seconds)
