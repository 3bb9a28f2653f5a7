"""Encoding feature maps for people and programs: .npy bytes, per-channel statistics and a
PNG per input image with the channels tiled in a grid, each channel normalised on its own
and coloured with a viridis-like map. Numpy and Pillow only."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

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


def npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The bytes np.save writes before the data of a C-ordered array of `shape`, `dtype`."""
    fields = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(d) for d in shape)}
    buf = io.BytesIO()
    try:
        np.lib.format.write_array_header_1_0(buf, fields)
    except ValueError:  # a header too long for format 1.0: np.save writes 2.0 then
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, fields)
    return buf.getvalue()


def npy_chunks(array: np.ndarray, chunk: int = 8 << 20) -> Iterator[bytes | memoryview]:
    """The same bytes as `np.save` (header, then the C-ordered data), as the header and
    views of the array's own memory: an artifact store writes them without a second copy of
    the maps in memory."""
    array = np.ascontiguousarray(array)
    yield npy_header(array.shape, array.dtype)
    data = memoryview(array.reshape(-1).view(np.uint8).data)
    for start in range(0, len(data), chunk):
        yield data[start:start + chunk]


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


class ChannelStats:
    """channel_stats accumulated batch by batch: per channel the sum (float64), min, max and
    zero count, so a job never holds more than one batch to describe all of its maps."""

    def __init__(self) -> None:
        self.total: np.ndarray | None = None
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.zeros: np.ndarray | None = None
        self.count = 0  # values per channel so far

    def add(self, maps: np.ndarray) -> None:
        if maps.size == 0:
            return
        # (N, C, ...) as (N, C*positions), a view of the rows as they come: each reduction
        # runs down axis 0 (element-wise over whole rows, no copy of the maps), then the C
        # channels' positions are reduced on the small (C, positions) result. Two passes
        # over a tiny array instead of a channels-first copy of the batch: 8 vs 18 ms a
        # batch of every vgg-small layer (256 images, 8x8 inputs). Min, max and zero counts
        # are exact either way; the float64 sums differ only in their summation order.
        n, c = maps.shape[0], maps.shape[1]
        # float16 as it is (each value is exact in float32 as in float64); anything else as
        # float32, as channel_stats reads it
        flat = np.ascontiguousarray(maps, dtype=None if maps.dtype == np.float16
                                    else np.float32).reshape(n, -1)
        low = flat.min(axis=0).reshape(c, -1).min(axis=1).astype(np.float32)
        high = flat.max(axis=0).reshape(c, -1).max(axis=1).astype(np.float32)
        total = flat.sum(axis=0, dtype=np.float64).reshape(c, -1).sum(axis=1)
        # the zero flags summed down the rows as uint8 -> uint16 (no bool -> int64 cast of
        # every value), exact while a block has fewer than 65,536 rows
        counter = np.uint16 if n < 1 << 16 else np.int64
        zeros = np.add.reduce((flat == 0).view(np.uint8), axis=0, dtype=counter)
        zeros = zeros.reshape(c, -1).sum(axis=1, dtype=np.int64)
        if self.total is None:
            self.total, self.low, self.high, self.zeros = total, low, high, zeros
        else:
            assert self.low is not None and self.high is not None and self.zeros is not None
            self.total = self.total + total
            self.low = np.minimum(self.low, low)
            self.high = np.maximum(self.high, high)
            self.zeros = self.zeros + zeros
        self.count += flat.size // c

    def result(self) -> dict[str, list[float]]:
        if self.total is None:
            return {"mean": [], "min": [], "max": [], "zero_fraction": []}
        assert self.low is not None and self.high is not None and self.zeros is not None
        return {
            "mean": [round(float(v), 6) for v in self.total / self.count],
            "min": [float(v) for v in self.low],
            "max": [float(v) for v in self.high],
            "zero_fraction": [round(float(v), 6) for v in self.zeros / self.count],
        }


def grid_shape(channels: int) -> tuple[int, int]:
    cols = math.ceil(math.sqrt(channels))
    return math.ceil(channels / cols), cols


def tile_scale(h: int, w: int) -> int:
    """Small maps are enlarged (nearest neighbour) so each tile is at least ~32 pixels."""
    return max(1, min(MAX_SCALE, math.ceil(MIN_TILE / max(h, w))))


def grids(maps: np.ndarray) -> np.ndarray:
    """(N, C, H, W) maps -> (N, height, width, 3) uint8 pictures, all images at once:
    channels row-major in the grid, each normalised to its own min..max."""
    n, c, h, w = maps.shape
    x = maps.astype(np.float32, copy=False)
    lo = x.min(axis=(2, 3), keepdims=True)
    span = x.max(axis=(2, 3), keepdims=True) - lo
    # a constant channel is drawn at the bottom colour
    scale = np.divide(255.0, span, out=np.zeros_like(span), where=span > 0)
    tiles = LUT[((x - lo) * scale).round().astype(np.uint8)]  # (N, C, H, W, 3)
    s = tile_scale(h, w)
    if s > 1:
        tiles = tiles.repeat(s, axis=2).repeat(s, axis=3)
    th, tw = h * s, w * s
    rows, cols = grid_shape(c)
    # each tile with a gap below and to the right; empty grid cells are all gap
    canvas = np.full((n, rows * cols, th + GAP, tw + GAP, 3), GAP_COLOUR, dtype=np.uint8)
    canvas[:, :c, :th, :tw] = tiles
    canvas = canvas.reshape(n, rows, cols, th + GAP, tw + GAP, 3).transpose(0, 1, 3, 2, 4, 5)
    canvas = canvas.reshape(n, rows * (th + GAP), cols * (tw + GAP), 3)
    return canvas[:, :-GAP, :-GAP]


def encode_png(picture: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # fast compression: these are many small images written on the job's critical path
    Image.fromarray(np.ascontiguousarray(picture), "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def png_images(maps: np.ndarray, chunk: int = 32) -> Iterator[bytes]:
    """A PNG per input image of (N, C, H, W) maps, drawn `chunk` images at a time so the
    pictures in memory stay bounded."""
    for start in range(0, len(maps), chunk):
        yield from (encode_png(p) for p in grids(maps[start:start + chunk]))


def png_bytes(maps: np.ndarray) -> bytes:
    """One input's [C, H, W] maps as a PNG grid."""
    return encode_png(grids(maps[None])[0])
