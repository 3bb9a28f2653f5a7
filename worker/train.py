"""The training loop: a plain function that knows nothing of Celery or HTTP.

Data lives on the device as one tensor and batches are slices of a random permutation
(no per-sample DataLoader work); metrics accumulate on the device and sync once per epoch.
Each epoch reseeds from (seed, epoch), so a run resumed from a checkpoint draws the same
batches, dropout masks and augmentations (worker/augment.py) as one that never stopped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from convoy.jobspec import TrainConfig
from worker.augment import augment_batch, augment_generator
from worker.control import Progress, Stopped
from worker.shard import Shard


@dataclass
class DeviceData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @classmethod
    def from_numpy(cls, split: Any, device: torch.device) -> DeviceData:
        def put(a: Any) -> torch.Tensor:
            return torch.from_numpy(a).to(device, non_blocking=True)

        return cls(put(split.x_train), put(split.y_train), put(split.x_val), put(split.y_val))


@dataclass
class EpochReport:
    epoch: int  # 1-based, the epoch just finished
    step: int  # optimizer steps so far
    metrics: dict[str, float]
    model: nn.Module
    optimizer: torch.optim.Optimizer


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"loss became NaN at epoch {epoch} step {step}")
        self.epoch, self.step = epoch, step


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, epoch0: int) -> float:
    """Learning rate for 0-based epoch `epoch0`; a pure function, so resume needs no state."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch0 / cfg.epochs))
    return cfg.lr


def first_non_finite(losses: torch.Tensor) -> int:
    """Index of the first NaN/inf in `losses`, or -1; one host sync."""
    bad = ~torch.isfinite(losses)
    return int(torch.where(bad.any(), bad.int().argmax(), -1))


def seed_torch(seed: int, device: torch.device) -> None:
    """torch.manual_seed(seed) for work on `device`: the same CPU generator state (and, on
    CUDA, every CUDA generator), without its cost where CUDA is not initialised. There
    torch.manual_seed queues a CUDA and an XPU seed for later, each with the caller's stack
    formatted (traceback.format_stack reads every frame's source line): about 2 ms per call
    in a plain script and more in a worker's deep stack, paid at every epoch."""
    if device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)  # at once: the data are on the device by then


def epoch_seed(seed: int, epoch0: int) -> int:
    return (seed * 1_000_003 + epoch0) % (2**63)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 1024,
             autocast: Callable[[], Any] | None = None) -> tuple[float, float]:
    """Mean loss and accuracy over (x, y), in eval mode, synced once."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        if autocast is not None:
            with autocast():
                logits = model(xb)
        else:
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(1, len(x))
    return loss_sum.item() / n, correct.item() / n


def _evaluate(model: nn.Module, data: DeviceData, autocast: Callable[[], Any] | None,
              shard: Shard | None) -> tuple[float, float]:
    if shard is None:
        return evaluate(model, data.x_val, data.y_val, autocast=autocast)
    return shard.evaluate(model, data.x_val, data.y_val, evaluate=evaluate, autocast=autocast)


def train(
    model: nn.Module,
    data: DeviceData,
    cfg: TrainConfig,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    on_epoch: Callable[[EpochReport], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: Progress | None = None,
    check_every_s: float = 0.25,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """Train `model` from `start_epoch` (0-based count of finished epochs) to cfg.epochs.
    With `shard` (one rank of a DistributedDataParallel `model`), this rank takes its share
    of every global batch and the epoch's metrics are reduced over the ranks."""
    device = data.x_train.device
    optimizer = optimizer or make_optimizer(model, cfg)
    progress = progress or Progress()
    autocast = None
    if device.type == "cuda" and cfg.amp:
        def autocast() -> Any:
            return torch.autocast("cuda", dtype=torch.bfloat16)

    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    step = start_epoch * steps_per_epoch
    metrics: dict[str, float] = {}
    model.train()
    for epoch0 in range(start_epoch, cfg.epochs):
        # --- the epoch's randomness and learning rate, both pure functions of (seed, epoch)
        seed_torch(epoch_seed(cfg.seed, epoch0), device)
        lr = lr_at(cfg, epoch0)
        for group in optimizer.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, device=device)
        augment = augment_generator(device, epoch_seed(cfg.seed, epoch0)) \
            if cfg.augment is not None else None
        # Each step's loss, predictions and labels kept as they come (no op per step beyond
        # the argmax; a slot written in place costs an index op per step, a running sum
        # plus a NaN flag several: they showed on small CPU models), stacked once per epoch.
        losses: list[torch.Tensor] = []
        preds: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        epoch_first_step = step
        started = time.perf_counter()
        last_check = started

        # --- the hot loop: slices of the permutation, no host syncs but the periodic check
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            lo, hi = (0, len(idx)) if shard is None else shard.bounds(len(idx))
            mine = idx if shard is None else idx[lo:hi]
            if augment is not None and cfg.augment is not None:
                # the whole global batch's draws, as on one device; a rank keeps its share
                xb = augment_batch(data.x_train[idx], cfg.augment, augment)[lo:hi]
            else:
                xb = data.x_train[mine]
            yb = data.y_train[mine]
            if autocast is not None:
                with autocast():
                    logits = model(xb)
            else:
                logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb) if shard is None \
                else shard.loss(logits.float(), yb, len(idx))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.detach())
            preds.append(logits.detach().argmax(1))
            labels.append(yb)
            progress.value = (epoch0 + (i + 1) / steps_per_epoch) / cfg.epochs
            now = time.perf_counter()
            if now - last_check >= check_every_s:
                last_check = now
                if (bad := first_non_finite(torch.stack(losses))) >= 0:
                    raise NonFiniteLoss(epoch0 + 1, epoch_first_step + bad + 1)
                if should_stop is not None and should_stop():
                    raise Stopped()
        step_losses = torch.stack(losses)
        if shard is not None:
            # each rank's slot holds its sum x world / batch: summed and divided by world it
            # is the global batch's mean loss, as on one device
            step_losses = shard.sum(step_losses) / shard.world
        if (bad := first_non_finite(step_losses)) >= 0:
            raise NonFiniteLoss(epoch0 + 1, epoch_first_step + bad + 1)
        # every batch is full but the last: weight each step's mean loss by its batch size
        sizes = torch.full_like(step_losses, cfg.batch_size)
        sizes[-1] = n - (steps_per_epoch - 1) * cfg.batch_size
        train_loss = (step_losses * sizes).sum().item() / n
        correct = (torch.cat(preds) == torch.cat(labels)).sum()
        if shard is not None:
            correct = shard.sum(correct)
        train_seconds = time.perf_counter() - started

        # --- evaluation, under no_grad in eval mode
        val_loss, val_accuracy = _evaluate(model, data, autocast, shard)
        metrics = {
            "train_loss": train_loss,
            "train_accuracy": correct.item() / n,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "images_per_second": n / max(train_seconds, 1e-9),
            "lr": lr,
        }
        if shard is not None:
            metrics["world_size"] = shard.world
        progress.epoch = epoch0 + 1
        if on_epoch is not None:
            on_epoch(EpochReport(epoch0 + 1, step, metrics, model, optimizer))
        if should_stop is not None and should_stop():
            raise Stopped()
    if not metrics:
        # resumed from the last epoch's checkpoint (the worker died before recording the
        # outcome): nothing is left to train, but the result must still report the model
        val_loss, val_accuracy = _evaluate(model, data, autocast, shard)
        metrics = {"val_loss": val_loss, "val_accuracy": val_accuracy}
    return {
        "epochs_done": cfg.epochs,
        "steps": step,
        **{k: metrics[k] for k in ("val_accuracy", "val_loss", "train_loss", "train_accuracy")
           if k in metrics},
    }
