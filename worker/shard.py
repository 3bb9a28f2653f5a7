"""A rank's share of a data-parallel job: which part of every global batch it takes, the
loss scaling that makes DDP's gradient average equal the one-device gradient, and the sums
the epoch's metrics are reduced with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Shard:
    rank: int
    world: int

    def bounds(self, batch: int) -> tuple[int, int]:
        """This rank's [lo, hi) of a global batch of `batch` samples: contiguous shares in
        rank order, sizes differing by at most one (as torch.tensor_split), so the ranks
        together take exactly the one-device batch, in its order."""
        base, extra = divmod(batch, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    def loss(self, logits: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor:
        """This rank's cross-entropy sum x world / global batch: DDP averages gradients over
        the ranks, which then gives exactly the gradient of the global batch's mean loss,
        whatever the shares (a last partial batch, sizes differing by one)."""
        return F.cross_entropy(logits, y, reduction="sum") * (self.world / batch)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over the ranks (every rank gets it)."""
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                 evaluate: Callable[..., tuple[float, float]],
                 autocast: Callable[[], Any] | None = None) -> tuple[float, float]:
        """Mean loss and accuracy over (x, y), each rank evaluating its contiguous part with
        the plain module (no DDP hooks), the sums reduced."""
        lo, hi = self.bounds(len(x))
        plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) \
            else model
        loss, acc = evaluate(plain, x[lo:hi], y[lo:hi], autocast=autocast) if hi > lo \
            else (0.0, 0.0)
        sums = self.sum(torch.tensor([loss * (hi - lo), acc * (hi - lo)],
                                     dtype=torch.float64, device=x.device))
        n = max(1, len(x))
        return float(sums[0]) / n, float(sums[1]) / n
