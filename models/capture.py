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

from convoy.featuremaps import pool_window


@dataclass
class Captured:
    index: int
    # what gets stored: the layer's output, or its extra-pooled version
    maps: torch.Tensor
    # for a maxpool2d layer: the flat position (row * W_in + col) in its input plane of each
    # pooled value, as torch's return_indices gives it
    argmax: torch.Tensor | None = None
    # for extra max pooling: the flat position in the layer's own (unpooled) plane
    pool_argmax: torch.Tensor | None = None


def extra_pool(t: torch.Tensor, pool: dict[str, Any] | None
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool [N, C, H, W] maps by the request's rule (convoy.featuremaps.pooled_shape)."""
    if pool is None or t.dim() != 4:
        return t, None
    n, c, h, w = t.shape
    if pool.get("global"):
        flat = t.flatten(2)
        if pool["type"] == "avg":
            return flat.mean(-1).view(n, c, 1, 1), None
        values, idx = flat.max(-1)
        return values.view(n, c, 1, 1), idx.view(n, c, 1, 1)
    k = int(pool["kernel_size"])
    kernel = (pool_window(h, k), pool_window(w, k))
    if pool["type"] == "avg":
        # ceil mode: an edge window averages only the values it covers
        return F.avg_pool2d(t, kernel, kernel, ceil_mode=True, count_include_pad=False), None
    values, idx = F.max_pool2d(t, kernel, kernel, ceil_mode=True, return_indices=True)
    return values, idx


def capture(model: nn.Module, x: torch.Tensor, wanted: Sequence[int],
            pool: dict[str, Any] | None = None) -> dict[int, Captured]:
    """The outputs of the layers in `wanted` for the batch `x`; layers after the last one
    wanted are not run."""
    wanted_set, last = set(wanted), max(wanted)
    out: dict[int, Captured] = {}
    for i, layer in enumerate(model.layers):  # type: ignore[arg-type]
        if i > last:
            break
        argmax = None
        if i in wanted_set and isinstance(layer, nn.MaxPool2d):
            # the same values as layer(x), plus where each maximum came from
            y, argmax = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding,
                                     layer.dilation, ceil_mode=layer.ceil_mode,
                                     return_indices=True)
        else:
            y = layer(x)
        if i in wanted_set:
            maps, pool_argmax = extra_pool(y, pool)
            out[i] = Captured(i, maps, argmax, pool_argmax)
        x = y
    return out
