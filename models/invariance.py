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

from models.capture import capture, channels_last, forward_layers
from models.transforms import Transform, variants

BATCH = 256


def transform_list(transforms: dict[str, list[int | float]]) -> list[Transform]:
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


def cosines(nb: torch.Tensor, nm: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """cos(φ(x), φ(Tx)) from ‖φ(x)‖, ‖φ(Tx)‖ and ‖φ(x) − φ(Tx)‖ (the dot product is
    (‖a‖² + ‖b‖² − ‖a − b‖²) / 2, in float64): 1 for two zero vectors, 0 for one. No pass over
    the maps multiplies them."""
    nb, nm, d = nb.double(), nm.double(), d.double()
    norms = nb * nm
    dot = (nb * nb + nm * nm - d * d) / 2
    both_zero = (nb == 0) & (nm == 0)
    return torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(norms.dtype).tiny),
                       both_zero.to(dot.dtype)).clamp(-1, 1)


# the between-inputs distance is the mean over pairs within groups of this many consecutive
# inputs (every pair when there are no more): all pairs of a 256-input batch cost as much as
# the model's forward pass on small models, for no better an estimate of a mean
PAIR_GROUP = 32


def pair_distance_sum(base: torch.Tensor, group: int = PAIR_GROUP) -> tuple[torch.Tensor, int]:
    """The sum of ‖φ(x) − φ(x′)‖₂ over the unordered pairs of different rows of `base` in each
    group of `group` consecutive rows, and the number of those pairs. From the Gram matrix in
    float64 (one product instead of a difference per pair)."""
    n = base.shape[0]
    full = n // group * group
    groups = [base[:full].reshape(n // group, group, -1)] if full else []
    if full < n:
        groups.append(base[None, full:])
    total, count = torch.zeros((), dtype=torch.float64, device=base.device), 0
    for g in groups:
        b = g.double()
        sq = (b * b).sum(-1)
        d2 = (sq[:, :, None] + sq[:, None, :] - 2 * (b @ b.transpose(1, 2))).clamp_min(0)
        total += d2.sqrt().triu(1).sum()
        count += g.shape[0] * g.shape[1] * (g.shape[1] - 1) // 2
    return total, count


@dataclass
class Meter:
    """Sums per layer and transformed copy, over the inputs. Within a batch, each chunk of
    copies writes its norms into [copies, batch] buffers (two passes over its maps: the
    difference's norm and its own); the cosines and sums follow once per batch."""

    layers: list[int]
    copies: int
    device: torch.device
    cos: dict[int, torch.Tensor] = field(default_factory=dict)
    dist: dict[int, torch.Tensor] = field(default_factory=dict)
    pair: dict[int, torch.Tensor] = field(default_factory=dict)
    pairs: int = 0
    agree: torch.Tensor | None = None
    prob: torch.Tensor | None = None
    base_correct: float = 0.0
    base_prob: float = 0.0
    inputs: int = 0
    # the batch under way: its maps, their norms, and the buffers the chunks fill
    base: dict[int, torch.Tensor] = field(default_factory=dict)
    base_norm: dict[int, torch.Tensor] = field(default_factory=dict)
    moved_norm: dict[int, torch.Tensor] = field(default_factory=dict)
    diff_norm: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def zeros(n: int | None = None) -> torch.Tensor:
            return torch.zeros(() if n is None else n, dtype=torch.float64, device=self.device)

        self.cos = {i: zeros(self.copies) for i in self.layers}
        self.dist = {i: zeros(self.copies) for i in self.layers}
        self.pair = {i: zeros() for i in self.layers}
        self.agree, self.prob = zeros(self.copies), zeros(self.copies)

    def begin(self, base: dict[int, torch.Tensor], logits: torch.Tensor | None,
              labels: torch.Tensor | None) -> None:
        n = next(iter(base.values())).shape[0]
        pairs = 0
        for i in self.layers:
            total, pairs = pair_distance_sum(base[i])
            self.pair[i] += total
            self.base_norm[i] = torch.linalg.vector_norm(base[i], dim=-1)
            self.moved_norm[i] = base[i].new_empty(self.copies, n)
            self.diff_norm[i] = base[i].new_empty(self.copies, n)
        self.base = base
        self.pairs += pairs
        self.inputs += n
        if logits is not None and labels is not None:
            self.base_correct += float((logits.argmax(-1) == labels).sum())
            self.base_prob += float(logits.float().softmax(-1).gather(1, labels[:, None]).sum())

    def add(self, first: int, moved: dict[int, torch.Tensor],
            logits: tuple[torch.Tensor, torch.Tensor] | None, labels: torch.Tensor | None
            ) -> None:
        """Copies first, first + 1, ... (as many as `moved` holds) of the batch begun. Takes
        `moved`'s maps for its own: each becomes its difference from the batch's maps in
        place (a second map-sized buffer per layer would cost more than the subtraction)."""
        if logits is not None:
            assert self.agree is not None and self.prob is not None
            original = logits[0]
            after = logits[1].view(-1, *original.shape)
            rows = slice(first, first + after.shape[0])
            self.agree[rows] += (after.argmax(-1) == original.argmax(-1)).double().sum(-1)
            if labels is not None:
                index = labels[None, :, None].expand(after.shape[0], -1, 1)
                self.prob[rows] += after.float().softmax(-1).gather(2, index).double().sum((1, 2))
        # maps that are views of one another (a flatten of an unmeasured layer's output) are
        # subtracted out of place: each must keep its values until its own turn
        where = [moved[i].untyped_storage().data_ptr() for i in self.layers]
        for i, ptr in zip(self.layers, where, strict=True):
            b = self.base[i]
            m = moved[i].view(-1, *b.shape)
            rows = slice(first, first + m.shape[0])
            torch.linalg.vector_norm(m, dim=-1, out=self.moved_norm[i][rows])
            diff = m - b if where.count(ptr) > 1 else m.sub_(b)
            torch.linalg.vector_norm(diff, dim=-1, out=self.diff_norm[i][rows])

    def end(self) -> None:
        # one check per layer and batch: a NaN or an infinity anywhere in a map makes its norm
        # non-finite (and the cosine would silently read 0, the distance null)
        for i in self.layers:
            if not (bool(torch.isfinite(self.base_norm[i]).all())
                    and bool(torch.isfinite(self.moved_norm[i]).all())):
                raise NonFiniteMaps(i)
        for i in self.layers:
            self.cos[i] += cosines(self.base_norm[i][None], self.moved_norm[i],
                                   self.diff_norm[i]).sum(-1)
            self.dist[i] += self.diff_norm[i].double().sum(-1)
        self.base = {}


class NonFiniteMaps(ValueError):
    """A measured layer's maps hold NaN or infinite values (weights that are not finite, or
    that overflow float32): no cosine or distance is defined."""

    def __init__(self, index: int, name: str | None = None) -> None:
        self.index, self.name = index, name
        super().__init__(f"layer {name or index}: its maps hold NaN or infinite values for "
                         "these inputs (are the model's weights finite?), so no invariance "
                         "measure is defined")


@dataclass
class Measured:
    """What `measure` found: per layer index, per (family, magnitude), (cosine, distance); for
    a classifier's output, per (family, magnitude), (agreement, true class probability)."""

    layers: dict[int, dict[tuple[str, float], tuple[float, float | None]]]
    output: dict[tuple[str, float], tuple[float, float | None]] | None
    original: dict[str, float] | None  # accuracy and true class probability, untransformed
    images: int  # images through the model, originals included


def same_values(layers: Sequence[nn.Module], wanted: list[int]) -> dict[int, int]:
    """Wanted layers whose maps hold the same values as the wanted layer before them (a
    flatten, or a dropout in eval mode): their measures are that layer's, not measured again."""
    return {i: i - 1 for i in wanted if i - 1 in wanted
            and isinstance(layers[i], nn.Flatten | nn.Dropout)}


def summarize(meter: Meter, copies: list[Transform], classify: bool, labelled: bool,
              aliases: dict[int, int]) -> Measured:
    keys = list(dict.fromkeys((t.family, t.magnitude) for t in copies))
    slots = {key: [j for j, t in enumerate(copies) if (t.family, t.magnitude) == key]
             for key in keys}

    def mean(sums: np.ndarray, key: tuple[str, float]) -> float:
        return float(sums[slots[key]].sum() / (meter.inputs * len(slots[key])))

    layers: dict[int, dict[tuple[str, float], tuple[float, float | None]]] = {}
    for i in meter.layers:
        cos, dist = meter.cos[i].cpu().numpy(), meter.dist[i].cpu().numpy()
        between = float(meter.pair[i]) / meter.pairs if meter.pairs else 0.0
        layers[i] = {key: (mean(cos, key), mean(dist, key) / between if between > 0 else None)
                     for key in keys}
    for i, same in sorted(aliases.items()):
        layers[i] = layers[same]
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
    layers = forward_layers(model)
    last = len(layers) - 1
    run_layers = sorted(set(wanted) | {last})
    copies = transform_list(transforms)
    per_batch = min(len(x), batch)
    groups = chunks(len(copies), per_batch, batch)
    aliases = same_values(layers, wanted)
    while any(same in aliases for same in aliases.values()):  # flatten after dropout
        aliases = {i: aliases.get(same, same) for i, same in aliases.items()}
    meter = Meter([i for i in wanted if i not in aliases], len(copies), device)
    labelled = classes is not None and labels is not None and int(labels.max()) < classes
    batches = range(0, len(x), per_batch)
    with torch.inference_mode():
        for b, start in enumerate(batches):
            xb = torch.from_numpy(np.ascontiguousarray(x[start:start + per_batch])).to(device)
            yb = torch.from_numpy(labels[start:start + per_batch]).to(device) \
                if labelled and labels is not None else None
            base = forward(model, xb, run_layers)
            out = base[last] if classes is not None else None
            meter.begin(base, out, yb)
            for g, group in enumerate(groups):
                xt = torch.cat([copies[j].apply(xb) for j in group])
                moved = forward(model, xt, run_layers)
                meter.add(group[0], moved, None if out is None else (out, moved[last]), yb)
                if step is not None:
                    step((b + (g + 1) / len(groups)) / len(batches))
            meter.end()
    return summarize(meter, copies, classes is not None, labelled, aliases)
