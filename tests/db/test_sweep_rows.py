"""db.jobs.prune_job and db.sweeps.add_trial on a real PostgreSQL database (issue 20)."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from db import jobs, sweeps
from db.session import session_scope
from db.tables import Job, SweepTrial
from tests.db.test_transitions import running, state_of
from tests.factories import train_request


def record(db_url: str, job_id: str, epoch: int) -> bool:
    with session_scope(db_url) as session:
        return jobs.record_epoch(session, job_id=job_id, worker_id="w", epoch=epoch,
                                 step=epoch * 10, metrics={"val_accuracy": epoch / 10},
                                 progress=epoch / 5)


def test_prune_ends_running_succeeded_with_the_judged_epoch_only(db_url: str):
    job_id = running(db_url)
    assert record(db_url, job_id, 1) and record(db_url, job_id, 2)
    with session_scope(db_url) as session:
        # the pruner judged epoch 1, but the worker has recorded epoch 2 since: no change
        assert not jobs.prune_job(session, job_id=job_id, epoch=1, reason="r")
    assert state_of(db_url, job_id) == "running"
    with session_scope(db_url) as session:
        assert jobs.prune_job(session, job_id=job_id, epoch=2, reason="poor")
    with session_scope(db_url) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == "succeeded"
        assert job.result == {"pruned": True, "epochs_done": 2, "val_accuracy": 0.2}
        # once ended it cannot be pruned again, and the worker can record nothing more
        assert not jobs.prune_job(session, job_id=job_id, epoch=2, reason="again")
    assert not record(db_url, job_id, 3)


def test_a_trial_number_is_created_once_with_its_job(db_url: str):
    with session_scope(db_url) as session:
        sweep, created = sweeps.create_sweep(session, tenant="t", name="s",
                                             request={"sweep": {}, "base": {}})
        assert created
        fields = {"kind": "train", "name": "s trial 0", "request": train_request(1),
                  "summary": None, "max_attempts": 1}
        first = sweeps.add_trial(session, sweep=sweep, number=0, params={"a": 1},
                                 max_queued=100, job_fields=fields)
        assert isinstance(first, Job) and first.sweep_id == sweep.id
        again = sweeps.add_trial(session, sweep=sweep, number=0, params={"a": 2},
                                 max_queued=100, job_fields=fields)
        assert again is False
        with pytest.raises(jobs.QueueFull):
            sweeps.add_trial(session, sweep=sweep, number=1, params={"a": 3}, max_queued=0,
                             job_fields=fields)
        assert session.scalar(select(func.count()).select_from(SweepTrial)
                              .where(SweepTrial.sweep_id == sweep.id)) == 1
        assert session.scalar(select(func.count()).select_from(Job)
                              .where(Job.sweep_id == sweep.id)) == 1
