"""What the training loop, the lease thread and feature-map extraction share without
importing each other: the loop's progress, read by the lease thread, and the signal to stop."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Stopped(Exception):
    """The caller asked the loop to stop (canceled, or the lease was lost)."""


@dataclass
class Progress:
    value: float = 0.0
    epoch: int = 0


class RunOutcome(StrEnum):
    """What one delivery of a job's message came to in this worker (the task's return value,
    for logs and tests); the job's own state is in the database."""

    DONE = "done"  # the attempt ran to its outcome (succeeded, or failed by the job)
    FAILED = "failed"  # the job failed (its error is recorded)
    SKIPPED = "skipped"  # not claimable: a duplicate message, canceled, or running elsewhere
    DEFERRED = "deferred"  # its tenant is at max_running_per_tenant: sent again later
    STOPPED = "stopped"  # canceled, timed out or lease lost between steps
    RELEASED = "released"  # handed back by this worker's shutdown; sent on to another
    LOST = "lost"  # the database stayed away: left to its lease
    RETRY = "retry"  # a storage error: queued again, sent after a backoff
    REQUEUED = "requeued"  # a rank of a multi-device attempt died: queued again, sent now
    PASSED_ON = "passed on"  # reached a worker already stopping: sent on, nothing claimed
