"""The words a job's life is told in: its states and how each attempt ended. StrEnums, so
they compare equal to the plain strings stored in the database and sent over the API."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELED})


class AttemptOutcome(StrEnum):
    """How one claim of a job by a worker ended (job_attempts.outcome)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"  # canceled while it ran
    RELEASED = "released"  # handed back by a worker shutting down
    LEASE_EXPIRED = "lease_expired"  # the reconciler took it back from a silent worker
    LOST = "lost"  # the lease was gone before the worker could record an outcome
    STORE_ERROR = "store_error"  # the artifact store failed; queued again after a backoff
    RANK_FAILED = "rank_failed"  # a rank of a multi-device attempt died; queued again
