"""What the training loop, the lease thread and feature-map extraction share without
importing each other: the loop's progress, read by the lease thread, and the signal to stop."""

from __future__ import annotations

from dataclasses import dataclass


class Stopped(Exception):
    """The caller asked the loop to stop (canceled, or the lease was lost)."""


@dataclass
class Progress:
    value: float = 0.0
    epoch: int = 0
