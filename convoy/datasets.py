"""Datasets as numpy arrays (x float32 (N, C, H, W), y int64): `digits` (scikit-learn's 8x8
digits with a fixed stratified split), `synthetic` (generated shapes) and uploaded .npz files.
Numpy only: the API reads the metadata, the worker turns the arrays into tensors."""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DIGITS_SAMPLES = 1797
SHAPES = ("square", "disc", "cross", "triangle", "ring", "bar")


class DigitsRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["digits"]


class SyntheticRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["synthetic"]
    samples: Annotated[int, Field(ge=10, le=200_000)] = 2048
    size: Annotated[int, Field(ge=8, le=512)] = 32
    channels: Annotated[int, Field(ge=1, le=16)] = 3
    num_classes: Annotated[int, Field(ge=2, le=len(SHAPES))] = 4
    seed: int = 0


class UploadRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]


DatasetRef = DigitsRef | SyntheticRef | UploadRef


@dataclass(frozen=True)
class DatasetInfo:
    input_shape: tuple[int, int, int]
    num_classes: int
    samples: int


@dataclass
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray

    @property
    def all_x(self) -> np.ndarray:
        return np.concatenate([self.x_train, self.x_val])


def builtin_info(ref: DigitsRef | SyntheticRef) -> DatasetInfo:
    if isinstance(ref, DigitsRef):
        return DatasetInfo((1, 8, 8), 10, DIGITS_SAMPLES)
    return DatasetInfo((ref.channels, ref.size, ref.size), ref.num_classes, ref.samples)


def _stratified_split(x: np.ndarray, y: np.ndarray, val_fraction: float, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    val_idx: list[np.ndarray] = []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        val_idx.append(idx[: max(1, round(len(idx) * val_fraction))])
    val = np.sort(np.concatenate(val_idx))
    mask = np.ones(len(y), dtype=bool)
    mask[val] = False
    return Split(x[mask], y[mask], x[val], y[val])


def load_digits() -> Split:
    # Parsing scikit-learn's CSV took 40-60 ms, the largest fixed cost of a short job
    # (bench/RESULTS.md), so a worker parses it once; callers get copies (115 kB).
    cached = _digits_split()
    return Split(*(a.copy() for a in (cached.x_train, cached.y_train, cached.x_val,
                                      cached.y_val)))


@lru_cache(maxsize=1)
def _digits_split() -> Split:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = (data.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    # fixed forever: seed 0, 20% of each class for validation
    return _stratified_split(x, y, 0.2, seed=0)


def _draw(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(0.2, 0.35) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    t = max(1.0, size / 12)
    if kind == "square":
        m = (dy <= r) & (dx <= r)
    elif kind == "disc":
        m = dist <= r
    elif kind == "cross":
        m = ((dy <= t) & (dx <= r)) | ((dx <= t) & (dy <= r))
    elif kind == "triangle":
        m = (yy >= cy - r) & (yy <= cy + r) & (dx <= (yy - (cy - r)) / 2)
    elif kind == "ring":
        m = (dist <= r) & (dist >= r - 2 * t)
    else:  # bar
        m = (dy <= t) & (dx <= r)
    return m.astype(np.float32)


def load_synthetic(ref: SyntheticRef) -> Split:
    rng = np.random.default_rng(ref.seed)
    y = np.arange(ref.samples, dtype=np.int64) % ref.num_classes
    rng.shuffle(y)
    x = np.empty((ref.samples, ref.channels, ref.size, ref.size), dtype=np.float32)
    for i, label in enumerate(y):
        mask = _draw(SHAPES[label], ref.size, rng)
        colour = rng.uniform(0.5, 1.0, (ref.channels, 1, 1)).astype(np.float32)
        x[i] = mask * colour + rng.normal(0, 0.1, (ref.channels, ref.size, ref.size))
    return _stratified_split(x, y, 0.2, seed=ref.seed)


class BadDataset(ValueError):
    pass


def parse_npz(data: bytes, *, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """An uploaded dataset: an .npz with `x` (N, C, H, W) or (N, H, W) and integer `y` (N,).
    Never unpickles (allow_pickle=False)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            if "x" not in archive or "y" not in archive:
                raise BadDataset("the .npz must hold arrays named 'x' and 'y'")
            x, y = archive["x"], archive["y"]
    except BadDataset:
        raise
    except Exception as exc:  # zip errors, pickled object arrays, truncated files
        raise BadDataset(f"not a readable .npz without pickles: {exc}") from exc
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise BadDataset(f"x must have shape (N, C, H, W) or (N, H, W); got {list(x.shape)}")
    if not (np.issubdtype(x.dtype, np.number) and not np.iscomplexobj(x)):
        raise BadDataset(f"x must be numeric; got dtype {x.dtype}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise BadDataset(f"y must be integers of shape ({len(x)},); got {y.dtype} {list(y.shape)}")
    if len(x) < 2:
        raise BadDataset("need at least 2 samples")
    if x.shape[2] * x.shape[3] > max_pixels or x.shape[1] > 64:
        raise BadDataset(f"images of {list(x.shape[1:])} are larger than allowed")
    if y.min() < 0:
        raise BadDataset("labels in y must be >= 0")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise BadDataset("x holds NaN or infinite values")
    return x, y.astype(np.int64)


def split_uploaded(x: np.ndarray, y: np.ndarray) -> Split:
    if len(np.unique(y)) * 2 > len(y):
        rng = np.random.default_rng(0)
        idx = rng.permutation(len(y))
        cut = max(1, len(y) // 5)
        return Split(x[idx[cut:]], y[idx[cut:]], x[idx[:cut]], y[idx[:cut]])
    return _stratified_split(x, y, 0.2, seed=0)


def describe(ref_data: dict[str, Any]) -> str:
    return ref_data.get("name") or f"upload {ref_data.get('id')}"
