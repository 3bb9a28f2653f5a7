"""Job state transitions: every one is a conditional UPDATE, so a duplicate message or a
late worker can never move a job backwards or run it twice at once. Nothing else writes state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from sqlalchemy import bindparam, delete, func, literal, select, text, update
from sqlalchemy.orm import Session

from db import artifacts as artifacts_db
from db import attempts, idempotency, webhooks
from db import metrics as metrics_db
from db.base import rowcount, utcnow
from db.ids import new_id
from db.job_reads import get_job, job_state
from db.joblog import log
from db.leases import owned
from db.states import AttemptOutcome, JobState
from db.tables import Artifact, Job, JobAttempt, JobLog, Metric


class WrongState(RuntimeError):
    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


def create_job(
    session: Session,
    *,
    tenant: str,
    kind: str,
    name: str,
    request: dict[str, Any],
    summary: dict[str, Any] | None,
    max_attempts: int,
    timeout_seconds: float | None = None,
    job_id: str | None = None,
) -> Job:
    now = utcnow()
    job = Job(
        id=job_id or new_id(),
        tenant=tenant,
        kind=kind,
        name=name,
        state=JobState.QUEUED,
        request=request,
        summary=summary,
        attempt=1,
        max_attempts=max_attempts,
        created_at=now,
        updated_at=now,
        enqueued_at=now,
        timeout_seconds=timeout_seconds,
    )
    session.add(job)
    return job


class QueueFull(RuntimeError):
    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"tenant has {queued} queued jobs, the limit max_queued_per_tenant "
                         f"is {limit}")
        self.queued, self.limit = queued, limit


def _advisory_lock(session: Session, namespace: str, tenant: str) -> None:
    """PostgreSQL: a transaction-scoped advisory lock on (namespace, tenant)."""
    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:namespace), hashtext(:tenant))"),
                    {"namespace": namespace, "tenant": tenant})


def lock_tenant_writes(session: Session, tenant: str) -> None:
    """Serialise the tenant's submissions until the transaction ends, so a count and the
    insert it allows cannot interleave with another's. PostgreSQL: a transaction-scoped
    advisory lock (its own namespace: claims are not held up by it). SQLite: BEGIN IMMEDIATE
    takes the database's write lock now, before the count, instead of at the INSERT (a
    deferred transaction reads first and so lets every concurrent request count the same)."""
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        _advisory_lock(session, "convoy-submit", tenant)
    elif conn.dialect.name == "sqlite":
        raw = conn.connection.dbapi_connection
        # a transaction already writing holds the write lock; otherwise take it now
        if raw is not None and not raw.in_transaction:
            raw.execute("BEGIN IMMEDIATE")


def create_job_once(
    session: Session,
    *,
    tenant: str,
    max_queued: int,
    idem: idempotency.Idem | None = None,
    idem_ttl_seconds: float = 24 * 3600.0,
    **fields: Any,
) -> tuple[Job, bool]:
    """(job, created): the tenant's new queued job, committed, within max_queued; or, for an
    idempotency key (db.idempotency.Idem) already used with the same body, the job it created
    (created False). QueueFull past the quota; db.idempotency.KeyReused for a key used with
    another body. The quota count, the key check and the inserts share one transaction under
    the tenant's lock."""
    lock_tenant_writes(session, tenant)
    if idem is not None:
        existing = idempotency.find(session, idem, ttl_seconds=idem_ttl_seconds)
        job = session.get(Job, existing, populate_existing=True) if existing else None
        if job is not None:
            session.commit()
            return job, False
        if existing is not None:  # its job is gone: the key starts afresh
            idempotency.forget(session, idem)
    queued = session.scalar(_QUEUED_OF, {"tenant": tenant}) or 0
    if queued >= max_queued:
        session.rollback()
        raise QueueFull(queued, max_queued)
    job = create_job(session, tenant=tenant, **fields)
    if idem is not None:
        idempotency.remember(session, idem, job.id)
    session.commit()
    return job, True


# built once, as claim_job's statements are
_QUEUED_OF = select(func.count()).select_from(Job).where(
    Job.tenant == bindparam("tenant"), Job.state == JobState.QUEUED)


class TenantAtLimit(RuntimeError):
    """The job's tenant already runs its limit of jobs: the job stays queued, to be sent again."""


def _tenant_locked(session: Session, job_id: str) -> str | None:
    """The job's tenant, its claims serialised until the transaction ends, so two workers
    cannot both see a free slot; None when there is no such job. PostgreSQL: a
    transaction-scoped advisory lock, taken by the statement that reads the tenant (one round
    trip; the claim's UPDATE reads a snapshot taken after it). SQLite: the UPDATE is one
    statement under the database's single write lock, which already serialises it."""
    if session.get_bind().dialect.name != "postgresql":
        return session.scalar(_TENANT_OF, {"job_id": job_id})
    row = session.execute(_TENANT_LOCKED_PG, {"job_id": job_id}).first()
    return row[0] if row else None


# claim_job's statements, built once: building them per claim cost about as much Python time
# as their round trips (bench/RESULTS.md, issue 22). The values come as bound parameters.
_TENANT_OF = select(Job.tenant).where(Job.id == bindparam("job_id"))
_TENANT_LOCKED_PG = select(Job.tenant, func.pg_advisory_xact_lock(
    func.hashtext(literal("convoy-tenant")), func.hashtext(Job.tenant))).where(
    Job.id == bindparam("job_id"))


def _claim_update(limited: bool) -> Any:
    """UPDATE queued -> running RETURNING the row; `limited`: only while the job's tenant
    (:of_tenant) runs fewer than :max_running jobs. Parameter names other than columns'."""
    limit: list[Any] = []
    if limited:
        running = (select(func.count()).select_from(Job)
                   .where(Job.tenant == bindparam("of_tenant"), Job.state == JobState.RUNNING)
                   .scalar_subquery())
        limit = [running < bindparam("max_running")]
    now = bindparam("at", type_=Job.__table__.c.updated_at.type)
    return (update(Job)
            .where(Job.id == bindparam("job_id"), Job.state == JobState.QUEUED, *limit)
            .values(state=JobState.RUNNING, worker_id=bindparam("by_worker"),
                    heartbeat_at=now, updated_at=now, progress=Job.progress,
                    # an attempt after the first keeps its started_at
                    started_at=func.coalesce(Job.started_at, now))
            .returning(Job))


_CLAIM = {False: _claim_update(False), True: _claim_update(True)}


def claim_job(session: Session, *, job_id: str, worker_id: str,
              max_running: int | None = None,
              started: Callable[[Job], tuple[str, str] | None] | None = None) -> Job | None:
    """queued -> running under this worker's lease; None when someone else has it or it ended.

    With `max_running`, the claim succeeds only while the job's tenant has fewer running jobs;
    otherwise the job stays queued (its enqueued_at renewed) and TenantAtLimit is raised.
    `started(job)`, called with the claimed row, may give the attempt's device and the line
    that opens the attempt in the job's log: both commit with the claim (it must not raise).
    Four round trips on PostgreSQL (five with the line): the tenant and its lock, the UPDATE
    returning the row, the attempt's INSERT, the commit."""
    now = utcnow()
    params: dict[str, Any] = {"job_id": job_id, "by_worker": worker_id, "at": now}
    limited = max_running is not None
    if limited:
        tenant = _tenant_locked(session, job_id)
        if tenant is None:
            session.rollback()
            return None
        params.update(of_tenant=tenant, max_running=max_running)
    job = session.scalars(
        _CLAIM[limited], params,
        execution_options={"populate_existing": True, "synchronize_session": False},
    ).one_or_none()
    if job is None:
        session.rollback()
        if limited and rowcount(session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED)
            .values(enqueued_at=now).execution_options(synchronize_session=False)
        )) == 1:
            # Still queued, so the limit is what refused it. enqueued_at=now keeps the
            # reconciler from resending it while the deferred message is on its way.
            session.commit()
            raise TenantAtLimit(f"job {job_id}: tenant is at max_running_per_tenant="
                                f"{max_running}")
        session.rollback()
        return None
    opened = started(job) if started is not None else None
    device, line = (opened[0][:32], opened[1]) if opened else (None, None)
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(_OPEN_PG, {"job_id": job_id, "attempt": job.attempt, "worker_id": worker_id,
                                "now": now, "device": device, "line": line})
    else:
        session.add(JobAttempt(job_id=job_id, attempt=job.attempt, worker_id=worker_id,
                               started_at=now, device=device))
        if line is not None:
            log(session, job_id=job_id, message=line)
    session.commit()
    return job


# claim_job's attempt row and first log line on PostgreSQL: one statement, not an ORM flush
# of two INSERTs. Same effect as the session.add calls beside it.
_OPEN_PG = text("""
WITH attempt AS (
    INSERT INTO job_attempts (job_id, attempt, worker_id, started_at, device)
    VALUES (:job_id, :attempt, :worker_id, :now, :device)
)
INSERT INTO job_logs (job_id, at, level, message)
SELECT :job_id, :now, 'info', CAST(:line AS text) WHERE CAST(:line AS text) IS NOT NULL
""")


class EpochPoints(NamedTuple):
    """One finished epoch's metric values, at the step it ended on."""

    epoch: int
    step: int
    metrics: Mapping[str, float]


# Epochs' points, upserted on their unique key, selecting from the fencing UPDATE's `job`
# row (no row, no point): the `points` CTE of _RECORD_PG and _SUCCEED_PG, with _point_params.
_POINTS_CTE = """
    INSERT INTO metrics (job_id, name, step, epoch, value, created_at)
    SELECT job.id, p.name, p.step, p.epoch, p.value, :now
    FROM job, unnest(CAST(:names AS varchar[]), CAST(:values AS double precision[]),
                     CAST(:steps AS integer[]), CAST(:epochs AS integer[]))
        AS p(name, value, step, epoch)
    ON CONFLICT (job_id, name, step) DO UPDATE SET epoch = excluded.epoch,
        value = excluded.value
"""


def _point_params(points: Sequence[EpochPoints]) -> dict[str, list[Any]]:
    return {"names": [n for p in points for n in p.metrics],
            "values": [float(v) for p in points for v in p.metrics.values()],
            "steps": [p.step for p in points for _ in p.metrics],
            "epochs": [p.epoch for p in points for _ in p.metrics]}


# record_epoch on PostgreSQL for an epoch without files: the lease-fenced UPDATE and the
# points' upsert as one statement (the INSERT selects from the UPDATE's row, so a worker that
# lost its lease writes no point either). Same effect as the statements below.
_RECORD_PG = text("""
WITH job AS (
    UPDATE jobs SET progress = :progress, heartbeat_at = :now, updated_at = :now
    WHERE id = :job_id AND state = :running AND worker_id = :worker_id
    RETURNING id
), points AS ("""
    + _POINTS_CTE + """)
SELECT count(*) FROM job
""")


def record_epoch(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    epoch: int,
    step: int,
    metrics: Mapping[str, float],
    progress: float,
    artifacts: Iterable[Artifact] = (),
    before_commit: Callable[[Session], None] | None = None,
    earlier: Sequence[EpochPoints] = (),
) -> bool:
    """One transaction per epoch: its metrics, its checkpoint rows (if it wrote any) and the
    progress and lease renewal together, so a resumed attempt finds exactly the epochs it can
    continue from. `earlier`: the points of epochs before it that no transaction recorded yet
    (a worker records short epochs together, worker.train_job), written with its own. Three
    statements and the commit: the conditional UPDATE (the lease fence, which also holds the
    job's row until the commit, so a cancel waits for it), one multi-row INSERT of the
    points, one of the artifact rows. `before_commit` runs in that transaction
    after the rows are written (the retention decision: rows it deletes go with this commit,
    before any file is removed). Idempotent: a retried commit writes nothing twice."""
    now = utcnow()
    conn = session.connection()
    if not artifacts and before_commit is None and conn.dialect.name == "postgresql":
        # an epoch without a checkpoint (the usual one under a cadence): a single statement
        recorded = conn.execute(_RECORD_PG, {
            "job_id": job_id, "worker_id": worker_id, "running": JobState.RUNNING.value,
            "progress": progress, "now": now,
            **_point_params([*earlier, EpochPoints(epoch, step, metrics)]),
        }).scalar_one()
        if recorded != 1:
            session.rollback()
            return False
        session.commit()
        return True
    # Core statements on the session's connection: no ORM bulk-update machinery per epoch
    result = conn.execute(
        update(Job).where(owned(job_id, worker_id))
        .values(progress=progress, heartbeat_at=now, updated_at=now))
    return _epoch_rows(session, fenced=result.rowcount == 1, job_id=job_id,
                       points=[*earlier, EpochPoints(epoch, step, metrics)],
                       artifacts=artifacts, before_commit=before_commit)


def _epoch_rows(session: Session, *, fenced: bool, job_id: str, points: Sequence[EpochPoints],
                artifacts: Iterable[Artifact],
                before_commit: Callable[[Session], None] | None) -> bool:
    """After the fencing UPDATE (`fenced`: it matched the job's row): epochs' points and
    artifact rows, the caller's decision, the commit; a rollback and False when not fenced."""
    if not fenced:
        session.rollback()
        return False
    _write_epoch_rows(session, job_id=job_id, points=points, artifacts=artifacts,
                      before_commit=before_commit)
    session.commit()
    return True


def _write_epoch_rows(session: Session, *, job_id: str, points: Sequence[EpochPoints],
                      artifacts: Iterable[Artifact],
                      before_commit: Callable[[Session], None] | None) -> None:
    """Epochs' points and artifact rows, then the caller's decision, in the open
    transaction (the caller has fenced it and commits)."""
    for p in points:
        metrics_db.put_step(session, job_id=job_id, step=p.step, epoch=p.epoch,
                            values=p.metrics)
    artifacts_db.put_rows(session, artifacts)
    if before_commit is not None:
        before_commit(session)


def stop_fence(job_id: str, worker_id: str, attempt: int) -> Any:
    """The WHERE clause of a stopping attempt's last checkpoint: the job is still this
    attempt's, running (a warm shutdown, a timeout) or canceled while it ran; not when its
    lease was lost to another attempt, nor after a sweep's pruner ended it."""
    return ((Job.id == job_id) & (Job.worker_id == worker_id) & (Job.attempt == attempt)
            & Job.state.in_((JobState.RUNNING, JobState.CANCELED)))


def may_write_stop_checkpoint(session: Session, *, job_id: str, worker_id: str,
                              attempt: int) -> bool:
    """Read-only: whether record_stop_checkpoint would be accepted now (checked before the
    files are written, so a worker whose lease was lost never overwrites another's)."""
    return session.execute(select(Job.id).where(
        stop_fence(job_id, worker_id, attempt))).first() is not None


def record_stop_checkpoint(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    attempt: int,
    epoch: int,
    step: int,
    metrics: Mapping[str, float],
    artifacts: Iterable[Artifact],
    before_commit: Callable[[Session], None] | None = None,
    earlier: Sequence[EpochPoints] = (),
) -> bool:
    """The checkpoint a stopping attempt (cancel, warm shutdown) writes of its last finished
    epoch when its cadence had skipped it, with that epoch's points (the epoch may have ended
    after the cancel refused its record_epoch) and the `earlier` ones not yet recorded (as
    record_epoch); under stop_fence, and the job's row locked by a no-op UPDATE until the
    commit. False (nothing written) when the fence refuses."""
    result = session.execute(
        update(Job).where(stop_fence(job_id, worker_id, attempt))
        .values(worker_id=Job.worker_id)
        .execution_options(synchronize_session=False)
    )
    return _epoch_rows(session, fenced=rowcount(result) == 1, job_id=job_id,
                       points=[*earlier, EpochPoints(epoch, step, metrics)],
                       artifacts=artifacts, before_commit=before_commit)


def finish_job(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    state: JobState,
    result: dict[str, Any] | None = None,
    error: str | None = None,
    log_line: str | None = None,
) -> bool:
    """running -> succeeded | failed, only by the worker that holds the lease; `log_line`
    goes to the job's log in the same transaction (a client that sees the outcome sees it)."""
    assert state in (JobState.SUCCEEDED, JobState.FAILED)
    now = utcnow()
    values: dict[str, Any] = {"state": state, "finished_at": now, "updated_at": now, "error": error}
    if result is not None:
        values["result"] = result
    if state == JobState.SUCCEEDED:
        values["progress"] = 1.0
    ended = session.execute(
        update(Job).where(owned(job_id, worker_id)).values(**values)
        .returning(*webhooks.ENDED_COLUMNS).execution_options(synchronize_session=False)
    ).one_or_none()
    done = ended is not None
    attempts.end(session, job_id=job_id, worker_id=worker_id,
                 outcome=AttemptOutcome(state) if done else AttemptOutcome.LOST,
                 error=error if done else "the lease was lost before the outcome was recorded")
    if done:  # the webhook outbox row commits with the state change
        webhooks.job_ended(session, job_id=job_id, ended=ended)
    if done and log_line:  # not when the lease was lost: another attempt owns the outcome
        log(session, job_id=job_id, message=log_line)
    session.commit()
    return done


# succeed_with_last_epoch on PostgreSQL: the fence (the job's UPDATE) and every row it
# writes as one statement, each INSERT selecting from the UPDATE's row, so a worker that lost
# its lease writes nothing; it says whether the tenant has webhook endpoints (then the
# outbox rows follow in the same transaction). Same effect as the statements below.
_SUCCEED_PG = text("""
WITH job AS (
    UPDATE jobs SET state = :succeeded, finished_at = :now, updated_at = :now,
        heartbeat_at = :now, error = NULL, result = CAST(:result AS json), progress = 1.0
    WHERE id = :job_id AND state = :running AND worker_id = :worker_id
    RETURNING id, tenant
), points AS ("""
    + _POINTS_CTE + """), files AS (
    INSERT INTO artifacts (job_id, tenant, kind, name, key, size, sha256, meta, created_at)
    SELECT f.job_id, f.tenant, f.kind, f.name, f.key, f.size, f.sha256, f.meta, :now
    FROM job, unnest(CAST(:f_jobs AS varchar[]), CAST(:f_tenants AS varchar[]),
                     CAST(:f_kinds AS varchar[]), CAST(:f_names AS varchar[]),
                     CAST(:f_keys AS varchar[]), CAST(:f_sizes AS bigint[]),
                     CAST(:f_shas AS varchar[]), CAST(:f_metas AS json[]))
        AS f(job_id, tenant, kind, name, key, size, sha256, meta)
    ON CONFLICT (job_id, kind, name) DO UPDATE SET key = excluded.key,
        size = excluded.size, sha256 = excluded.sha256, meta = excluded.meta
), attempt AS (
    UPDATE job_attempts SET ended_at = :now, outcome = :succeeded, error = NULL
    WHERE job_id IN (SELECT id FROM job) AND worker_id = :worker_id AND ended_at IS NULL
), line AS (
    INSERT INTO job_logs (job_id, at, level, message)
    SELECT job.id, :now, 'info', :line FROM job WHERE CAST(:line AS text) IS NOT NULL
)
SELECT EXISTS (SELECT 1 FROM webhook_endpoints e
               WHERE e.tenant = job.tenant AND e.disabled_at IS NULL)
FROM job
""")


def succeed_with_last_epoch(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    epoch: int,
    step: int,
    metrics: Mapping[str, float],
    artifacts: Iterable[Artifact],
    result: dict[str, Any],
    log_line: str | None = None,
    before_commit: Callable[[Session], None] | None = None,
    earlier: Sequence[EpochPoints] = (),
) -> bool:
    """The last epoch's record (its points, the `earlier` ones not yet recorded and its
    checkpoint rows, as record_epoch) and
    running -> succeeded (as finish_job) in one transaction, by the lease holder only: the
    job is never seen succeeded without its last checkpoint's rows, and a short job pays one
    transaction for both. The fence is the first statement, which also holds the job's row
    until the commit (a cancel waits for it). False, with nothing written, when the job is no
    longer this worker's (the caller stops as for a lost lease). A retried commit whose first
    try went through finds the job succeeded and returns False: the caller's stop path then
    reads that state. On PostgreSQL one statement and the commit (_SUCCEED_PG)."""
    now = utcnow()
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        files = list(artifacts)
        hooks = conn.execute(_SUCCEED_PG, {
            "job_id": job_id, "worker_id": worker_id, "now": now,
            "running": JobState.RUNNING.value, "succeeded": JobState.SUCCEEDED.value,
            "result": json.dumps(result),
            **_point_params([*earlier, EpochPoints(epoch, step, metrics)]),
            "f_jobs": [f.job_id for f in files], "f_tenants": [f.tenant for f in files],
            "f_kinds": [f.kind for f in files], "f_names": [f.name for f in files],
            "f_keys": [f.key for f in files], "f_sizes": [f.size for f in files],
            "f_shas": [f.sha256 for f in files],
            "f_metas": [json.dumps(f.meta) for f in files], "line": log_line,
        }).scalar_one_or_none()
        if hooks is None:
            session.rollback()
            return False
        if before_commit is not None:
            before_commit(session)
        if hooks:  # the outbox rows, with the state change
            webhooks.job_ended(session, job_id=job_id)
        session.commit()
        return True
    ended = session.execute(
        update(Job).where(owned(job_id, worker_id))
        .values(state=JobState.SUCCEEDED, finished_at=now, updated_at=now, heartbeat_at=now,
                error=None, result=result, progress=1.0)
        .returning(*webhooks.ENDED_COLUMNS).execution_options(synchronize_session=False)
    ).one_or_none()
    if ended is None:
        session.rollback()
        return False
    _write_epoch_rows(session, job_id=job_id,
                      points=[*earlier, EpochPoints(epoch, step, metrics)],
                      artifacts=artifacts, before_commit=before_commit)
    attempts.end(session, job_id=job_id, worker_id=worker_id, outcome=AttemptOutcome.SUCCEEDED)
    webhooks.job_ended(session, job_id=job_id, ended=ended)
    if log_line:
        log(session, job_id=job_id, message=log_line)
    session.commit()
    return True


def end_attempt(session: Session, *, job_id: str, worker_id: str,
                outcome: AttemptOutcome) -> None:
    attempts.end(session, job_id=job_id, worker_id=worker_id, outcome=outcome)
    session.commit()


def release_job(session: Session, *, job_id: str, worker_id: str) -> bool:
    """running -> queued by the lease holder, for a worker that shuts down: the next attempt
    resumes from the last checkpoint at once (no lease to wait out), and a planned shutdown
    does not use up the job's failure budget (max_attempts grows with attempt)."""
    now = utcnow()
    done = rowcount(session.execute(
        update(Job).where(owned(job_id, worker_id)).values(
            state=JobState.QUEUED, attempt=Job.attempt + 1, max_attempts=Job.max_attempts + 1,
            worker_id=None, heartbeat_at=None, enqueued_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )) == 1
    if not done:  # canceled meanwhile, or the lease was lost: the caller ends the attempt
        session.rollback()
        return False
    attempts.end(session, job_id=job_id, worker_id=worker_id, outcome=AttemptOutcome.RELEASED)
    log(session, job_id=job_id, level="warning",
        message=f"worker {worker_id} shut down: job handed back, the next attempt resumes "
                "from its last checkpoint (not counted toward max_attempts)")
    session.commit()
    return True


class StorageRetry(StrEnum):
    """What retry_after_storage_error did."""

    RETRY = "retry"  # queued again, to be sent after the backoff
    FAILED = "failed"  # no attempts left
    STOPPED = "stopped"  # the job was no longer this worker's (canceled, lease lost)


def retry_after_storage_error(session: Session, *, job_id: str, worker_id: str, error: str,
                              backoff_seconds: float,
                              outcome: AttemptOutcome = AttemptOutcome.STORE_ERROR,
                              cause: str = "a storage error") -> StorageRetry:
    """The lease holder's attempt hit a storage error (full, read-only store...): not the
    job's fault, so running -> queued with attempt + 1, to be sent again in
    `backoff_seconds`; past max_attempts running -> failed with that error. The attempt ends
    `store_error` and the job's log says why. (A lost rank of a multi-device attempt takes
    the same way with outcome `rank_failed`.)"""
    now = utcnow()
    job = session.execute(select(Job.attempt, Job.max_attempts).where(
        owned(job_id, worker_id))).first()
    if job is None:
        state = job_state(session, job_id=job_id)
        attempts.end(session, job_id=job_id, worker_id=worker_id,
                     outcome=AttemptOutcome.CANCELED if state == JobState.CANCELED
                     else AttemptOutcome.LOST)
        session.commit()
        return StorageRetry.STOPPED
    attempt, max_attempts = job
    if attempt < max_attempts:
        # enqueued_at is when the delayed message becomes due, so the reconciler does not
        # resend it (early) while it waits out the backoff.
        values: dict[str, Any] = {
            "state": JobState.QUEUED, "attempt": attempt + 1, "worker_id": None,
            "heartbeat_at": None, "updated_at": now,
            "enqueued_at": now + timedelta(seconds=backoff_seconds)}
        line = (f"attempt {attempt} stopped by {cause}: {error}; queued again, "
                f"attempt {attempt + 1} of {max_attempts} in {backoff_seconds:g} s")
    else:
        values = {"state": JobState.FAILED, "finished_at": now, "updated_at": now,
                  "error": f"{error} (on each of {max_attempts} attempts)"}
        line = (f"attempt {attempt} stopped by {cause}: {error}; no attempts left "
                f"(max_attempts {max_attempts}): failed")
    done = rowcount(session.execute(
        update(Job).where(owned(job_id, worker_id), Job.attempt == attempt).values(**values)
        .execution_options(synchronize_session=False)
    )) == 1
    if not done:  # canceled between the two statements
        session.rollback()
        return retry_after_storage_error(session, job_id=job_id, worker_id=worker_id,
                                         error=error, backoff_seconds=backoff_seconds,
                                         outcome=outcome, cause=cause)
    attempts.end(session, job_id=job_id, worker_id=worker_id, outcome=outcome, error=error)
    if values["state"] == JobState.FAILED:
        webhooks.job_ended(session, job_id=job_id)
    log(session, job_id=job_id, level="error", message=line)
    session.commit()
    return StorageRetry.RETRY if values["state"] == JobState.QUEUED else StorageRetry.FAILED


def cancel_job(session: Session, *, job_id: str, tenant: str | None) -> Job:
    """queued | running -> canceled; a running worker sees it between steps and stops."""
    job = get_job(session, job_id=job_id, tenant=tenant)
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.state.in_((JobState.QUEUED, JobState.RUNNING)))
        .values(state=JobState.CANCELED, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) == 1:
        webhooks.job_ended(session, job_id=job_id)
    session.commit()
    session.refresh(job)
    if rowcount(result) != 1:
        raise WrongState(job.state, f"job {job_id} is already {job.state}")
    return job


def requeue_expired(
    session: Session, *, lease_seconds: float, now: datetime | None = None
) -> list[str]:
    """Running jobs whose lease expired go back to queued with attempt + 1, or fail past
    max_attempts. Returns the ids that were requeued (to be enqueued again)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=lease_seconds)
    expired = session.execute(
        select(Job.id, Job.attempt, Job.max_attempts, Job.worker_id).where(
            Job.state == JobState.RUNNING, Job.heartbeat_at < cutoff
        )
    ).all()
    requeued: list[str] = []
    for job_id, attempt, max_attempts, worker_id in expired:
        stale = (Job.id == job_id) & (Job.state == JobState.RUNNING) & (Job.heartbeat_at < cutoff)
        if attempt >= max_attempts:
            values: dict[str, Any] = {
                "state": JobState.FAILED,
                "finished_at": now,
                "updated_at": now,
                "error": f"worker {worker_id} was lost and the job reached max_attempts "
                f"({max_attempts})",
            }
        else:
            values = {
                "state": JobState.QUEUED,
                "attempt": attempt + 1,
                "worker_id": None,
                "enqueued_at": now,
                "updated_at": now,
            }
        done = rowcount(session.execute(
            update(Job).where(stale).values(**values).execution_options(synchronize_session=False)
        )) == 1
        if done:
            attempts.end(session, job_id=job_id, worker_id=worker_id or "",
                         outcome=AttemptOutcome.LEASE_EXPIRED,
                         error=f"no heartbeat from worker {worker_id} for {lease_seconds:g} s")
            if values["state"] == JobState.FAILED:
                webhooks.job_ended(session, job_id=job_id)
            log(session, job_id=job_id, level="warning",
                message=f"lease of worker {worker_id} expired on attempt {attempt}")
            if values["state"] == JobState.QUEUED:
                requeued.append(job_id)
    session.commit()
    return requeued


def prune_job(session: Session, *, job_id: str, epoch: int, reason: str) -> bool:
    """running -> succeeded, for a sweep trial its pruner stopped after `epoch` (issue 20):
    result.pruned is true, with `epoch` as epochs_done and that epoch's metrics, and the
    checkpoints written so far are kept. A conditional update like cancel's: the worker sees
    its lease gone between steps and stops; its attempt ends `succeeded`. The last recorded
    epoch is read after the update holds the job's row: when the worker has recorded a later
    epoch than the pruner judged, nothing changes (False; the next pass judges again), so a
    later epoch can never be recorded after the prune nor one be lost from its result.
    False too when the job was no longer running."""
    now = utcnow()
    done = rowcount(session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.RUNNING)
        .values(state=JobState.SUCCEEDED, finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False))) == 1
    last = metrics_db.last_epoch(session, job_id=job_id) if done else None
    if last is None or last[0] != epoch:
        session.rollback()
        return False
    result = {"pruned": True, "epochs_done": epoch, **last[1]}
    session.execute(update(Job).where(Job.id == job_id).values(result=result)
                    .execution_options(synchronize_session=False))
    log(session, job_id=job_id, message=f"pruned after epoch {epoch}: {reason}")
    webhooks.job_ended(session, job_id=job_id)  # job.succeeded, with result.pruned
    session.commit()
    return True


ACTIVE = (JobState.QUEUED, JobState.RUNNING)
# the request fields that name another job or an upload
_REFERENCES = ("job_id", "checkpoint_id", "input_id", "id")


def _references(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            if key in _REFERENCES and isinstance(item, str):
                found.add(item)
            else:
                found |= _references(item)
    elif isinstance(value, list):
        for item in value:
            found |= _references(item)
    return found


def active_users(session: Session, *, tenant: str, ref: str) -> list[Job]:
    """The tenant's queued or running jobs whose request names `ref` (an upload's id, or a
    job's whose checkpoint they start from)."""
    return [job for job in session.scalars(
        select(Job).where(Job.tenant == tenant, Job.state.in_(ACTIVE), Job.id != ref))
        if ref in _references(job.request)]


def delete_job_rows(session: Session, *, job_id: str) -> bool:
    """Delete a finished job and every row of it (attempts, metrics, logs, artifacts) and
    commit; False when it is queued or running again (nothing deleted). The caller has
    removed its files first, so a crash half-way leaves a job that can be deleted again."""
    state = session.scalar(select(Job.state).where(Job.id == job_id).with_for_update())
    if state is None or state in ACTIVE:
        session.rollback()
        return False
    session.execute(delete(Artifact).where(Artifact.job_id == job_id))
    session.execute(delete(Metric).where(Metric.job_id == job_id))
    session.execute(delete(JobLog).where(JobLog.job_id == job_id))
    session.execute(delete(JobAttempt).where(JobAttempt.job_id == job_id))
    session.execute(delete(Job).where(Job.id == job_id))
    session.commit()
    return True
