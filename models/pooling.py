"""The extra pooling a feature-map request may ask for, in plain Python: the window on each
axis, the stored shape and the bytes. Shared by the API's checks at submission and the
capture in models/capture.py."""

from __future__ import annotations

import math
from typing import Any


def pool_window(size: int, kernel: int) -> int:
    """The extra pooling window on one axis: the requested kernel, clipped to the map."""
    return min(kernel, size)


def pooled_shape(shape: list[int], pool: dict[str, Any] | None) -> list[int]:
    """The stored per-sample shape of a layer's maps after the optional extra pooling.
    Only [C, H, W] maps are pooled; windows are kernel x kernel at stride kernel, and a
    partial window at the bottom/right edge is kept (ceil mode), so no value is dropped."""
    if pool is None or len(shape) != 3:
        return list(shape)
    c, h, w = shape
    if pool.get("global"):
        return [c, 1, 1]
    kernel = int(pool["kernel_size"])
    kh, kw = pool_window(h, kernel), pool_window(w, kernel)
    return [c, math.ceil(h / kh), math.ceil(w / kw)]


def map_bytes(count: int, shape: list[int], dtype: str) -> int:
    return count * math.prod(shape) * (2 if dtype == "float16" else 4)
