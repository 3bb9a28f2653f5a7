"""Invariance measures (docs/invariance.md): per layer and transform magnitude, the cosine and
the normalised distance between a layer's maps for an input and for its transformed copies;
for a classifier's output, the agreement of the argmax and the true class's probability.

Batched: a batch of inputs goes through the model once, then its transformed copies in chunks
of at most `batch` images; memory holds one batch of maps, never all of them. Sums are kept
per transformed copy on the device (no host sync per chunk) and reduced at the end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.capture import capture, channels_last
from models.transforms import Transform, variants

BATCH = 256


def transform_list(transforms: dict[str, list[float]]) -> list[Transform]:
    """Every transformed copy measured, family by family, magnitude by magnitude."""
    return [t for family, values in transforms.items() for m in values
            for t in variants(family, m)]


def chunks(count: int, inputs: int, batch: int = BATCH) -> list[list[int]]:
    """The copies (by position) that go through the model together: as many as fit in `batch`
    images, at least one."""
    per = max(1, batch // max(inputs, 1))
    return [list(range(i, min(i + per, count))) for i in range(0, count, per)]


def flat(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] as [N, D]. Channels-last maps are read in memory order (a view): cosines and
    distances do not depend on the order of the values, only on it being the same."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
    return t.reshape(t.shape[0], -1)


def cosine_distance(base: torch.Tensor, moved: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per copy and input: cos(φ(x), φ(Tx)) (1 for two zero vectors, 0 for one) and
    ‖φ(x) − φ(Tx)‖₂; `base` is [B, D], `moved` [K, B, D]."""
    dot = (moved * base).sum(-1)
    nb, nm = base.norm(dim=-1), moved.norm(dim=-1)
    both_zero = (nb == 0) & (nm == 0)
    norms = nb * nm
    cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                      both_zero.to(dot.dtype)).clamp(-1, 1)
    return cos, (moved - base).norm(dim=-1)


def pair_distance_sum(base: torch.Tensor) -> torch.Tensor:
    """The sum of ‖φ(x) − φ(x′)‖₂ over the unordered pairs of different rows of `base`."""
    b = base.double()
    sq = (b * b).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (b @ b.T)).clamp_min(0)
    return d2.sqrt().triu(1).sum()


@dataclass
class Meter:
    """Running sums per layer and transformed copy."""

    layers: list[int]
    copies: int
    device: torch.device
    cos: dict[int, torch.Tensor] = field(default_factory=dict)
    dist: dict[int, torch.Tensor] = field(default_factory=dict)
    pair: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)
    pairs: int = 0
    agree: torch.Tensor | None = None
    prob: torch.Tensor | None = None
    base_correct: float = 0.0
    base_prob: float = 0.0
    inputs: int = 0

    def __post_init__(self) -> None:
        def zeros(n: int | None = None) -> torch.Tensor:
            return torch.zeros(() if n is None else n, dtype=torch.float64, device=self.device)

        self.cos = {i: zeros(self.copies) for i in self.layers}
        self.dist = {i: zeros(self.copies) for i in self.layers}
        self.pair = {i: zeros() for i in self.layers}
        self.counts = [0] * self.copies
        self.agree, self.prob = zeros(self.copies), zeros(self.copies)

    def add_base(self, base: dict[int, torch.Tensor], logits: torch.Tensor | None,
                 labels: torch.Tensor | None) -> None:
        n = next(iter(base.values())).shape[0]
        for i in self.layers:
            self.pair[i] += pair_distance_sum(base[i])
        self.pairs += n * (n - 1) // 2
        self.inputs += n
        if logits is not None and labels is not None:
            self.base_correct += float((logits.argmax(-1) == labels).sum())
            self.base_prob += float(logits.float().softmax(-1).gather(1, labels[:, None]).sum())

    def add(self, slots: list[int], base: dict[int, torch.Tensor],
            moved: dict[int, torch.Tensor], logits: tuple[torch.Tensor, torch.Tensor] | None,
            labels: torch.Tensor | None) -> None:
        index = torch.tensor(slots, device=self.device)
        k = len(slots)
        for i in self.layers:
            b = base[i]
            cos, dist = cosine_distance(b, moved[i].view(k, *b.shape))
            self.cos[i].index_add_(0, index, cos.double().sum(-1))
            self.dist[i].index_add_(0, index, dist.double().sum(-1))
        n = next(iter(base.values())).shape[0]
        for s in slots:
            self.counts[s] += n
        if logits is not None:
            assert self.agree is not None and self.prob is not None
            original, after = logits[0], logits[1].view(k, *logits[0].shape)
            same = (after.argmax(-1) == original.argmax(-1)).double().sum(-1)
            self.agree.index_add_(0, index, same)
            if labels is not None:
                p = after.float().softmax(-1).gather(2, labels[None, :, None].expand(k, -1, 1))
                self.prob.index_add_(0, index, p.double().sum((1, 2)))


@dataclass
class Measured:
    """What `measure` found: per layer index, per (family, magnitude), (cosine, distance); for
    a classifier's output, per (family, magnitude), (agreement, true class probability)."""

    layers: dict[int, dict[tuple[str, float], tuple[float, float | None]]]
    output: dict[tuple[str, float], tuple[float, float | None]] | None
    original: dict[str, float] | None  # accuracy and true class probability, untransformed
    images: int  # images through the model, originals included


def summarize(meter: Meter, copies: list[Transform], classify: bool, labelled: bool
              ) -> Measured:
    keys = list(dict.fromkeys((t.family, t.magnitude) for t in copies))
    slots = {key: [j for j, t in enumerate(copies) if (t.family, t.magnitude) == key]
             for key in keys}

    def mean(sums: np.ndarray, key: tuple[str, float]) -> float:
        return float(sums[slots[key]].sum() / sum(meter.counts[j] for j in slots[key]))

    layers: dict[int, dict[tuple[str, float], tuple[float, float | None]]] = {}
    for i in meter.layers:
        cos, dist = meter.cos[i].cpu().numpy(), meter.dist[i].cpu().numpy()
        between = float(meter.pair[i]) / meter.pairs if meter.pairs else 0.0
        layers[i] = {key: (mean(cos, key), mean(dist, key) / between if between > 0 else None)
                     for key in keys}
    output = original = None
    if classify:
        assert meter.agree is not None and meter.prob is not None
        agree, prob = meter.agree.cpu().numpy(), meter.prob.cpu().numpy()
        output = {key: (mean(agree, key), mean(prob, key) if labelled else None)
                  for key in keys}
        if labelled:
            original = {"accuracy": meter.base_correct / meter.inputs,
                        "true_class_probability": meter.base_prob / meter.inputs}
    return Measured(layers, output, original, meter.inputs * (1 + len(copies)))


def forward(model: nn.Module, x: torch.Tensor, layers: Sequence[int]
            ) -> dict[int, torch.Tensor]:
    """The wanted layers' maps for the batch, each flattened to [N, D]."""
    got = capture(model, channels_last(model, x), layers, argmax=False)
    return {i: flat(c.maps) for i, c in got.items()}


def measure(model: nn.Module, x: np.ndarray, labels: np.ndarray | None, wanted: list[int],
            transforms: dict[str, list[float]], *, classes: int | None, device: torch.device,
            batch: int = BATCH, step: Callable[[float], Any] | None = None) -> Measured:
    """Every measure for the inputs `x` [N, C, H, W] (float32) and the layers `wanted`. The
    model's last layer is its output, measured as a classifier's when `classes` is given (its
    output is [N, classes]), with the true class's probability when `labels` fit those
    classes. `step(fraction done)` is called after each chunk (it may raise to stop)."""
    assert isinstance(model.layers, nn.ModuleList), "a models.build.ConvNet"
    last = len(model.layers) - 1
    run_layers = sorted(set(wanted) | {last})
    copies = transform_list(transforms)
    per_batch = min(len(x), batch)
    groups = chunks(len(copies), per_batch, batch)
    meter = Meter(wanted, len(copies), device)
    labelled = classes is not None and labels is not None and int(labels.max()) < classes
    batches = range(0, len(x), per_batch)
    with torch.inference_mode():
        for b, start in enumerate(batches):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + per_batch])).to(device)
            yb = torch.from_numpy(labels[start:start + per_batch]).to(device) \
                if labelled and labels is not None else None
            base = forward(model, xb, run_layers)
            out = base[last] if classes is not None else None
            meter.add_base(base, out, yb)
            for g, group in enumerate(groups):
                xt = torch.cat([copies[j].apply(xb) for j in group])
                moved = forward(model, xt, run_layers)
                meter.add(group, base, moved, None if out is None else (out, moved[last]), yb)
                if step is not None:
                    step((b + (g + 1) / len(groups)) / len(batches))
    return summarize(meter, copies, classes is not None, labelled)
