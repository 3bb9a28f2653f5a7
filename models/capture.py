"""Capture layer outputs of a ConvNet in one forward pass, with max-pooling argmax positions
and the optional extra pooling of the captured maps. Call it under torch.inference_mode()
on a model in eval() mode; it walks `model.layers` itself, so no hooks are needed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.build import ResidualBlock
from models.pooling import pool_window


@dataclass
class Captured:
    index: int
    # what gets stored: the layer's output, or its extra-pooled version
    maps: torch.Tensor
    # for a maxpool2d layer: the flat position (row * W_in + col) in its input plane of each
    # pooled value, as torch's return_indices gives it
    argmax: torch.Tensor | None = None


def _pool_layout(t: torch.Tensor) -> torch.Tensor:
    """On CPU, torch's NCHW pooling kernels are ~5x slower than its channels-last ones
    (bench/bench_feature_maps.py; same values and indices), so pool in channels-last there."""
    return t.contiguous(memory_format=torch.channels_last) if t.device.type == "cpu" else t


def channels_last(model: nn.Module, x: torch.Tensor | None = None) -> Any:
    """The model (or an input batch) in channels-last layout: faster convolutions on CPU
    (oneDNN) and on CUDA (cuDNN), and fast pooling; the values are the same maps."""
    if x is not None:
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    # torch's stubs list no memory_format for Module.to, though it takes one
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def max_pool_with_argmax(x: torch.Tensor, layer: nn.MaxPool2d
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values as layer(x), plus where each maximum came from; the output keeps the
    input's layout so the rest of the forward pass runs as it would without capture."""
    keep = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format
    y, idx = F.max_pool2d(_pool_layout(x), layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, ceil_mode=layer.ceil_mode, return_indices=True)
    return y.contiguous(memory_format=keep), idx


def extra_pool(t: torch.Tensor, pool: dict[str, Any] | None) -> torch.Tensor:
    """Pool [N, C, H, W] maps by the request's rule (models.pooling.pooled_shape)."""
    if pool is None or t.dim() != 4:
        return t
    n, c, h, w = t.shape
    if pool.get("global"):
        flat = t.flatten(2)
        return (flat.mean(-1) if pool["type"] == "avg" else flat.amax(-1)).view(n, c, 1, 1)
    k = int(pool["kernel_size"])
    kernel = (pool_window(h, k), pool_window(w, k))
    if pool["type"] == "avg":
        # ceil mode: an edge window averages only the values it covers
        out = F.avg_pool2d(_pool_layout(t), kernel, kernel, ceil_mode=True,
                           count_include_pad=False)
    else:
        out = F.max_pool2d(_pool_layout(t), kernel, kernel, ceil_mode=True)
    return out


def forward_layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in forward order, as capture() numbers them: a residual block's
    inner layers, then the block itself (its output is the sum)."""
    layers = model.layers
    assert isinstance(layers, nn.ModuleList), "a models.build.ConvNet"
    found: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, ResidualBlock):
            found.extend(layer.layers)
        found.append(layer)
    return found


def capture(model: nn.Module, x: torch.Tensor, wanted: Sequence[int],
            pool: dict[str, Any] | None = None, *, argmax: bool = True) -> dict[int, Captured]:
    """The outputs of the layers in `wanted` for the batch `x` (with the max-pooling argmax
    unless `argmax` is False); layers after the last one wanted are not run. A layer is its
    position in forward order (models.spec.named_rows: a residual block's inner layers come
    before the block, whose output is the sum), which is the spec's index for a model
    without blocks."""
    wanted_set, last = set(wanted), max(wanted)
    out: dict[int, Captured] = {}
    layers = model.layers
    assert isinstance(layers, nn.ModuleList), "a models.build.ConvNet"
    position = 0

    def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        nonlocal position
        i, where = position, None
        position += 1
        if argmax and i in wanted_set and isinstance(layer, nn.MaxPool2d):
            y, where = max_pool_with_argmax(x, layer)
        else:
            y = layer(x)
        if i in wanted_set:
            out[i] = Captured(i, extra_pool(y, pool), where)
        return y

    for layer in layers:
        if position > last:
            break
        if isinstance(layer, ResidualBlock):
            y = x
            for inner in layer.layers:
                if position > last:
                    return out
                y = run(inner, y)
            x = run(_Sum(layer.shortcut(x)), y)
        else:
            x = run(layer, x)
    return out


class _Sum(nn.Module):
    """A residual block's last step: its layers' output plus the shortcut."""

    def __init__(self, shortcut: torch.Tensor) -> None:
        super().__init__()
        self.shortcut = shortcut

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.shortcut
