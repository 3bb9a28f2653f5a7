"""The fence of a checkpoint's files (worker.train_job.TrainRun._may_write_files) on a real
PostgreSQL database: within half a lease of its newest renewal an attempt writes without a
lease check (no other attempt can hold the job yet); past that it asks the database, and a
worker whose lease was lost meanwhile writes nothing."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from sqlalchemy import event

from convoy.settings import Settings
from db import artifacts, jobs
from db.base import utcnow
from db.session import get_engine, session_scope
from db.tables import Job
from tests.factories import train_request
from worker import checkpoints
from worker.train import EpochReport
from worker.train_job import Finished, TrainRun, row_epoch


def claimed(migrated_url: str, tmp_path: Path, *, renewed_s_ago: float) -> tuple[TrainRun, Job]:
    with session_scope(migrated_url) as session:
        made = jobs.create_job(session, tenant="t", kind="train", name="fence",
                               request=train_request(1), summary=None, max_attempts=3)
    with session_scope(migrated_url) as session:
        job = jobs.claim_job(session, job_id=made.id, worker_id="w")
        assert job is not None
    settings = Settings(home=tmp_path, database_url=migrated_url, lease_seconds=30)
    run = TrainRun(settings, job, "w", claimed_at=time.monotonic() - renewed_s_ago)
    return run, job


def statements(migrated_url: str, fn: object) -> int:
    seen: list[str] = []

    def count(*_: object) -> None:
        seen.append("")

    engine = get_engine(migrated_url)
    event.listen(engine, "before_cursor_execute", count)
    try:
        assert callable(fn)
        fn()
    finally:
        event.remove(engine, "before_cursor_execute", count)
    return len(seen)


def test_a_fresh_claim_writes_files_without_asking_the_database(migrated_url, tmp_path):
    run, _ = claimed(migrated_url, tmp_path, renewed_s_ago=1)
    assert statements(migrated_url, lambda: run._may_write_files() or pytest.fail("refused")) == 0


def test_past_half_a_lease_the_database_decides(migrated_url, tmp_path):
    held, _ = claimed(migrated_url, tmp_path, renewed_s_ago=16)
    assert held._may_write_files()

    lost, job = claimed(migrated_url, tmp_path, renewed_s_ago=16)
    with session_scope(migrated_url) as session:  # the lease expired; the job is queued again
        requeued = jobs.requeue_expired(session, lease_seconds=30,
                                        now=utcnow() + timedelta(seconds=31))
        assert job.id in requeued
    assert not lost._may_write_files()


def test_an_epoch_record_renews_the_fence(migrated_url, tmp_path):
    run, _ = claimed(migrated_url, tmp_path, renewed_s_ago=16)
    assert not run._fresh()
    model = torch.nn.Linear(2, 2)
    done = Finished(1, 1, {"val_loss": 0.5},
                    checkpoints.snapshot(model, torch.optim.SGD(model.parameters(), lr=0.1)))
    run._persist_epoch(done, False)  # an epoch without files: its record renews the lease
    assert run._fresh() and not run.lease_lost
    assert statements(migrated_url, lambda: run._persist_epoch(done, True)) > 0  # the record only
    assert run.written == 1


# --- short epochs recorded together (settings.epoch_record_seconds) -------------------------

Points = list[tuple[int, int, str, float]]


def run_in_process(migrated_url: str, tmp_path: Path, epochs: int, **settings: object
                   ) -> tuple[str, str, Points, int]:
    """A digits job run through worker.runner.run_job here: (its id, its state, its metric
    points as (epoch, step, name, value), how many epoch records the worker sent)."""
    from db import metrics
    from worker import runner

    with session_scope(migrated_url) as session:
        job = jobs.create_job(session, tenant="t", kind="train", name="records",
                              request=train_request(epochs), summary=None, max_attempts=1)
    sent: list[int] = []
    real = jobs.record_epoch

    def counted(*args: object, **kwargs: object) -> bool:
        sent.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    jobs.record_epoch = counted  # type: ignore[assignment]
    try:
        runner.run_job(job.id, worker_id="w", settings=Settings(
            home=tmp_path, database_url=migrated_url, checkpoint_min_seconds=600,
            heartbeat_seconds=0.05, **settings))
    finally:
        jobs.record_epoch = real  # type: ignore[assignment]
    with session_scope(migrated_url) as session:
        state = jobs.get_job(session, job_id=job.id).state
        points = sorted((m.epoch, m.step, m.name, m.value)
                        for m in metrics.series(session, job_id=job.id))
    return job.id, state, points, len(sent)


def test_short_epochs_are_recorded_together_with_every_point_kept(migrated_url, tmp_path):
    _, each_state, each, each_sent = run_in_process(migrated_url, tmp_path / "a", 4,
                                                    epoch_record_seconds=0)
    _, together_state, together, together_sent = run_in_process(
        migrated_url, tmp_path / "b", 4, epoch_record_seconds=600)
    assert each_state == together_state == "succeeded"
    assert each_sent == 3  # epochs 1-3; the 4th commits with the outcome
    assert together_sent == 0  # every epoch goes with the outcome's one transaction
    assert {e for e, *_ in together} == {1, 2, 3, 4}
    # the same seed: the same values at the same steps, recorded either way (but the speed)
    assert [p for p in together if p[2] != "images_per_second"] == \
        [p for p in each if p[2] != "images_per_second"]


def test_a_failure_records_the_epochs_finished_before_it(migrated_url, tmp_path, monkeypatch):
    real = TrainRun.on_epoch

    def failing(self: TrainRun, report: EpochReport) -> None:
        if report.epoch == 3:
            raise RuntimeError("boom at epoch 3")
        real(self, report)

    monkeypatch.setattr(TrainRun, "on_epoch", failing)
    _, state, points, sent = run_in_process(migrated_url, tmp_path, 5,
                                            epoch_record_seconds=600)
    assert state == "failed"
    assert sent == 1  # the failure's flush: epochs 1 and 2 in one record
    assert {e for e, *_ in points} == {1, 2}


def test_a_cancel_records_every_finished_epoch_with_its_stop_checkpoint(
        migrated_url, tmp_path, monkeypatch):
    real = TrainRun.on_epoch

    def cancel_at_2(self: TrainRun, report: EpochReport) -> None:
        real(self, report)
        if report.epoch == 2:
            with session_scope(migrated_url) as session:
                jobs.cancel_job(session, job_id=self.job.id, tenant=None)

    monkeypatch.setattr(TrainRun, "on_epoch", cancel_at_2)
    job_id, state, points, sent = run_in_process(migrated_url, tmp_path, 200,
                                                 epoch_record_seconds=600)
    assert state == "canceled" and sent == 0
    epochs = {e for e, *_ in points}
    last = max(epochs)
    assert epochs == set(range(1, last + 1)) and 2 <= last < 200
    with session_scope(migrated_url) as session:
        kept = {row_epoch(r) for r in artifacts.resume_candidates(session, job_id=job_id)
                if r.kind == "checkpoint"}
    assert last in kept  # the stop checkpoint, written with the unrecorded epochs' points


def test_a_negative_epoch_record_interval_is_refused_by_name(tmp_path):
    with pytest.raises(ValidationError, match="epoch_record_seconds"):
        Settings(home=tmp_path, epoch_record_seconds=-1)


@pytest.mark.parametrize("epochs", [3, 5])
def test_a_first_attempt_reads_its_checkpoints_for_retention_only_past_keep_last(
        migrated_url, tmp_path, monkeypatch, epochs):
    """keep_last is 3 (the default) and every epoch is checkpointed: a first attempt with no
    more checkpoints than that keeps them all without reading the job's checkpoint rows; past
    it, the rows are read and the older ones dropped, rows and files."""
    from worker import runner

    with session_scope(migrated_url) as session:
        job = jobs.create_job(session, tenant="t", kind="train", name="retain",
                              request=train_request(epochs), summary=None, max_attempts=1)
    reads: list[str] = []
    real = artifacts.resume_index

    def counted(session: object, *, job_id: str) -> object:
        reads.append(job_id)
        return real(session, job_id=job_id)  # type: ignore[arg-type]

    monkeypatch.setattr(artifacts, "resume_index", counted)
    settings = Settings(home=tmp_path, database_url=migrated_url, checkpoint_min_seconds=0,
                        epoch_record_seconds=0)
    assert runner.run_job(job.id, worker_id="w", settings=settings) == "done"
    with session_scope(migrated_url) as session:
        assert jobs.get_job(session, job_id=job.id).state == "succeeded"
        rows = real(session, job_id=job.id)
    kept = sorted(e for r in rows if r.kind == "checkpoint" and (e := row_epoch(r)))
    assert kept == list(range(max(1, epochs - 2), epochs + 1))
    on_disk = sorted(p.name for p in tmp_path.rglob("epoch-*.safetensors")
                     if ".optimizer." not in p.name)
    assert len(on_disk) == len(kept)
    # epochs 4 and 5 each found more than keep_last checkpoints to choose from
    assert len(reads) == (0 if epochs <= 3 else 2)
