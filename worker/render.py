"""Encoding feature maps for people and programs: .npy bytes, per-channel statistics and a
PNG per input image with the channels tiled in a grid, each channel normalised on its own
and coloured with a viridis-like map. Numpy and Pillow only."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

# viridis at five stops, interpolated to 256 entries (no matplotlib needed)
_STOPS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)],
                  dtype=np.float32)
LUT = np.stack([np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_STOPS)), _STOPS[:, ch])
                for ch in range(3)], axis=1).round().astype(np.uint8)
GAP = 1
GAP_COLOUR = 255
MIN_TILE = 32
MAX_SCALE = 8


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def channel_stats(maps: np.ndarray) -> dict[str, list[float]]:
    """Per channel (axis 1) over all inputs and positions: mean, min, max, fraction of zeros."""
    x = maps.astype(np.float32, copy=False)
    axes = tuple(a for a in range(x.ndim) if a != 1)
    return {
        "mean": [round(float(v), 6) for v in x.mean(axis=axes, dtype=np.float64)],
        "min": [float(v) for v in x.min(axis=axes)],
        "max": [float(v) for v in x.max(axis=axes)],
        "zero_fraction": [round(float(v), 6) for v in (x == 0).mean(axis=axes)],
    }


def grid_shape(channels: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(channels))
    return math.ceil(channels / cols), cols


def tile_scale(h: int, w: int) -> int:
    """Small maps are enlarged (nearest neighbour) so each tile is at least ~32 pixels."""
    return max(1, min(MAX_SCALE, math.ceil(MIN_TILE / max(h, w))))


def png_bytes(maps: np.ndarray) -> bytes:
    """One input's [C, H, W] maps as a PNG grid, row-major by channel index."""
    c, h, w = maps.shape
    x = maps.astype(np.float32, copy=False)
    lo = x.min(axis=(1, 2), keepdims=True)
    span = x.max(axis=(1, 2), keepdims=True) - lo
    # each channel on its own scale; a constant channel is drawn at the bottom colour
    norm = np.where(span > 0, (x - lo) / np.where(span > 0, span, 1), 0.0)
    tiles = LUT[(norm * 255).round().astype(np.uint8)]  # (C, H, W, 3)
    s = tile_scale(h, w)
    if s > 1:
        tiles = tiles.repeat(s, axis=1).repeat(s, axis=2)
    th, tw = h * s, w * s
    rows, cols = grid_shape(c)
    canvas = np.full((rows * (th + GAP) - GAP, cols * (tw + GAP) - GAP, 3), GAP_COLOUR,
                     dtype=np.uint8)
    for k in range(c):
        r, q = divmod(k, cols)
        canvas[r * (th + GAP):r * (th + GAP) + th, q * (tw + GAP):q * (tw + GAP) + tw] = tiles[k]
    buf = io.BytesIO()
    # fast compression: these are many small images written on the job's critical path
    Image.fromarray(canvas, "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()
