"""Checkpoint retention: which of a train job's checkpoints stay after an epoch. A pure
function of the epochs and their recorded metric, so the worker, the tests and the docs
all apply the same rule."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from convoy.jobspec import CheckpointPolicy


@dataclass(frozen=True)
class Kept:
    models: frozenset[int]  # epochs whose model checkpoint stays
    optimizers: frozenset[int]  # epochs whose optimizer state stays (what resume may use)


def decide(metric_by_epoch: Mapping[int, float | None], policy: CheckpointPolicy) -> Kept:
    """The union of the `keep_last` newest epochs and the `keep_best` best by the metric
    (ties: the newer epoch); the newest always. A missing or NaN metric is never "best".
    Optimizer state stays with the `keep_last` newest only: resume starts from the newest
    intact checkpoint and falls back to older ones in order, never to a best-only one."""
    epochs = sorted(metric_by_epoch)
    if not epochs:
        return Kept(frozenset(), frozenset())
    if policy.keep_last is None:
        everything = frozenset(epochs)
        return Kept(everything, everything)
    last = set(epochs[-policy.keep_last:]) | {epochs[-1]}
    scored = [(float(v), e) for e, v in metric_by_epoch.items()
              if v is not None and not math.isnan(float(v))]
    sign = -1.0 if policy.mode == "max" else 1.0
    scored.sort(key=lambda ve: (sign * ve[0], -ve[1]))
    best = {e for _, e in scored[:policy.keep_best]}
    return Kept(frozenset(last | best), frozenset(last))
