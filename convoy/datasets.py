"""Datasets as numpy arrays (x float32 (N, C, H, W), y int64): `digits` (scikit-learn's 8x8
digits with a fixed stratified split), `synthetic` (generated shapes) and uploaded .npz files.
Numpy only: the API reads the metadata, the worker turns the arrays into tensors."""

from __future__ import annotations

import gzip
import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from convoy import npyfile

DIGITS_SAMPLES = 1797
# Labels index the classifier's outputs, and a linear layer has at most 1,000,000
# (models.spec): a larger label could never be trained on.
MAX_CLASSES = 1_000_000
SHAPES = ("square", "disc", "cross", "triangle", "ring", "bar", "diamond", "saltire",
          "frame", "half_disc")


class DigitsRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["digits"]


class SyntheticRef(BaseModel):
    """Generated images. `task: "shapes"` (the default): one shape per image, class = shape,
    on a plain noisy background. `task: "scenes"`: the CIFAR-sized task (defaults: 10
    classes, 3x32x32, 10,000 samples): each shape at a random scale and place, in a random
    colour, on a random smooth colour background with distractor strokes (docs/reference.md)."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["synthetic"]
    task: Literal["shapes", "scenes"] = "shapes"
    samples: Annotated[int, Field(ge=10, le=200_000)] = 2048
    size: Annotated[int, Field(ge=8, le=512)] = 32
    channels: Annotated[int, Field(ge=1, le=16)] = 3
    num_classes: Annotated[int, Field(ge=2, le=len(SHAPES))] = 4
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0  # numpy refuses negative seeds

    @model_validator(mode="before")
    @classmethod
    def _scene_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("task") == "scenes":
            return {"num_classes": len(SHAPES), "samples": 10_000, **data}
        return data


class UploadRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[0-9a-f]+$")]


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

    @property
    def all_y(self) -> np.ndarray:
        return np.concatenate([self.y_train, self.y_val])


def builtin_info(ref: DigitsRef | SyntheticRef) -> DatasetInfo:
    if isinstance(ref, DigitsRef):
        return DatasetInfo((1, 8, 8), 10, DIGITS_SAMPLES)
    return DatasetInfo((ref.channels, ref.size, ref.size), ref.num_classes, ref.samples)


def oversized(ref: Any, max_bytes: int | None) -> str | None:
    """Why a generated dataset would not fit in a worker's memory (its x as float32 over
    max_dataset_bytes), or None: said at submission, not as a MemoryError at run time."""
    if not isinstance(ref, SyntheticRef) or max_bytes is None:
        return None
    size = ref.samples * ref.channels * ref.size * ref.size * 4
    if size <= max_bytes:
        return None
    return (f"{ref.samples} samples of {[ref.channels, ref.size, ref.size]} take {size} bytes "
            f"as float32, over max_dataset_bytes={max_bytes}; use fewer samples or smaller "
            "images")


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


# The digits split's sizes (1,797 samples; 20% of each class for validation), known without
# loading scikit-learn: the API answers with them at submission. A test checks them against
# the loaded split.
DIGITS_SPLIT_SIZES = {"train": 1438, "val": 359, "all": 1797}


def split_sizes(y: np.ndarray, *, uploaded: bool) -> dict[str, int]:
    """Samples per split for labels `y`: the split depends on the labels alone, not on x."""
    empty = np.zeros((len(y), 0), dtype=np.float32)
    split = split_uploaded(empty, y) if uploaded else _stratified_split(empty, y, 0.2, seed=0)
    return {"train": len(split.y_train), "val": len(split.y_val), "all": len(y)}


def load_digits() -> Split:
    # Parsing scikit-learn's CSV took 40-60 ms, the largest fixed cost of a short job
    # (bench/RESULTS.md), so a worker parses it once; callers get copies (115 kB).
    cached = _digits_split()
    return Split(*(a.copy() for a in (cached.x_train, cached.y_train, cached.x_val,
                                      cached.y_val)))


def _digits_csv() -> Path | None:
    """scikit-learn's digits file, found without importing scikit-learn (0.5-1 s of a
    worker's start-up: bench/RESULTS.md); None when it is not where it has always been."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images (1797, 8, 8) float64 in 0..16, labels int): scikit-learn's load_digits()
    .images and .target, read as it reads them (np.loadtxt of its gzipped CSV)."""
    path = _digits_csv()
    if path is None:
        from sklearn.datasets import load_digits as sk_digits

        data = sk_digits()
        return data.images, data.target
    with gzip.open(path, mode="rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int, copy=False)


@lru_cache(maxsize=1)
def _digits_split() -> Split:
    images, target = digits_arrays()
    x = (images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = target.astype(np.int64)
    # fixed forever: seed 0, 20% of each class for validation
    return _stratified_split(x, y, 0.2, seed=0)


def _draw(kind: str, size: int, rng: np.random.Generator,
          scale: tuple[float, float] = (0.2, 0.35), thin: bool = False) -> np.ndarray:
    """A shape's mask; strokes are size/12 thick, or r/4 with `thin` (small shapes keep
    their hole: a ring stays a ring)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = rng.uniform(*scale) * size
    cy, cx = rng.uniform(r, size - r, 2)
    dy, dx = np.abs(yy - cy), np.abs(xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    t = max(1.0, r / 4 if thin else size / 12)
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
    elif kind == "bar":
        m = (dy <= t) & (dx <= r)
    elif kind == "diamond":
        m = dy + dx <= r
    elif kind == "saltire":  # a diagonal cross
        m = ((np.abs(dy - dx) <= t) | (np.abs((yy - cy) + (xx - cx)) <= t)) \
            & (dy <= r) & (dx <= r)
    elif kind == "frame":
        m = (dy <= r) & (dx <= r) & ((dy >= r - 2 * t) | (dx >= r - 2 * t))
    else:  # half_disc
        m = (dist <= r) & (yy >= cy)
    return m.astype(np.float32)


def _scene(label: int, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """One `scenes` image: a smooth random colour background (a 4x4 grid of random colours,
    bilinearly upsampled), four distractor strokes (random straight lines, 1 px), the
    class's shape at a random scale (15-32% of the side as its half-width) and place in a
    random colour at least 0.25 per channel (in norm) away from the background's mean, then
    N(0, 0.06) noise."""
    grid = rng.uniform(0.0, 1.0, (channels, 4, 4)).astype(np.float32)
    pos = np.linspace(0, 3, size, dtype=np.float32)
    i0 = np.minimum(pos.astype(int), 2)
    f = pos - i0
    rows = grid[:, i0] * (1 - f)[None, :, None] + grid[:, i0 + 1] * f[None, :, None]
    img = rows[:, :, i0] * (1 - f) + rows[:, :, i0 + 1] * f
    for _ in range(4):
        (y0, x0), (y1, x1) = rng.uniform(0, size - 1, (2, 2))
        n = int(max(abs(y1 - y0), abs(x1 - x0))) + 2
        ys = np.linspace(y0, y1, n).round().astype(int)
        xs = np.linspace(x0, x1, n).round().astype(int)
        img[:, ys, xs] = rng.uniform(0.0, 1.0, (channels, 1))
    mask = _draw(SHAPES[label], size, rng, scale=(0.15, 0.32), thin=True)
    mean = img.mean(axis=(1, 2))
    colour = rng.uniform(0.0, 1.0, channels).astype(np.float32)
    push = colour - mean
    norm = float(np.linalg.norm(push))
    if norm < 0.25 * math.sqrt(channels):
        # too close to the background: push it away from the mean (any direction when equal)
        direction = push / norm if norm > 1e-6 else np.ones(channels, np.float32)
        direction /= np.linalg.norm(direction)
        colour = np.clip(mean + direction * 0.25 * math.sqrt(channels) * 1.5, 0, 1)
    img = img * (1 - mask) + colour[:, None, None] * mask
    return img + rng.normal(0, 0.06, img.shape).astype(np.float32)


def load_synthetic(ref: SyntheticRef) -> Split:
    rng = np.random.default_rng(ref.seed)
    y = np.arange(ref.samples, dtype=np.int64) % ref.num_classes
    rng.shuffle(y)
    x = np.empty((ref.samples, ref.channels, ref.size, ref.size), dtype=np.float32)
    if ref.task == "scenes":
        for i, label in enumerate(y):
            x[i] = _scene(int(label), ref.size, ref.channels, rng)
        return _stratified_split(x, y, 0.2, seed=ref.seed)
    for i, label in enumerate(y):
        mask = _draw(SHAPES[label], ref.size, rng)
        colour = rng.uniform(0.5, 1.0, (ref.channels, 1, 1)).astype(np.float32)
        x[i] = mask * colour + rng.normal(0, 0.1, (ref.channels, ref.size, ref.size))
    return _stratified_split(x, y, 0.2, seed=ref.seed)


class BadDataset(ValueError):
    """An unusable dataset upload; `status` is 413 when it is only too large, else 422."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NpzSummary:
    """What the API keeps of an uploaded .npz: x's per-sample shape, and the labels."""
    input_shape: tuple[int, int, int]
    y: np.ndarray


def _open_npz(data: bytes, *, max_pixels: int, max_bytes: int) -> npyfile.Npz:
    """The archive with x's and y's headers checked against the limits; no data read yet."""
    try:
        archive = npyfile.Npz(data, ("x", "y"), max_bytes=max_bytes)
    except npyfile.BadArray as exc:
        raise BadDataset(str(exc), status=exc.status) from None
    x, y = archive.header("x"), archive.header("y")
    shape = x.shape if len(x.shape) != 3 else (x.shape[0], 1, *x.shape[1:])
    if len(shape) != 4:
        raise BadDataset(f"x must have shape (N, C, H, W) or (N, H, W); got {list(x.shape)}")
    if x.dtype.kind not in "iuf":
        raise BadDataset(f"x must be real numbers; got dtype {x.dtype}")
    if len(y.shape) != 1 or y.shape[0] != shape[0] or y.dtype.kind not in "iu":
        raise BadDataset(f"y must be integers of shape ({shape[0]},); got {y.dtype} "
                         f"{list(y.shape)}")
    if shape[0] < 2:
        raise BadDataset("need at least 2 samples")
    if shape[2] * shape[3] > max_pixels or shape[1] > 64:
        raise BadDataset(f"images of {list(shape[1:])} are larger than allowed (max_image_pixels="
                         f"{max_pixels}, at most 64 channels)", status=413)
    as_float32 = math.prod(shape) * 4
    if as_float32 > max_bytes:
        raise BadDataset(f"x {list(x.shape)} takes {as_float32} bytes as float32, over "
                         f"max_dataset_bytes={max_bytes}", status=413)
    return archive


def _labels(archive: npyfile.Npz) -> np.ndarray:
    try:
        y = archive.load("y")
    except npyfile.BadArray as exc:
        raise BadDataset(str(exc)) from None
    if y.min() < 0:
        raise BadDataset("labels in y must be >= 0")
    if y.max() >= MAX_CLASSES:
        raise BadDataset(f"labels in y must be < {MAX_CLASSES}; got {int(y.max())}")
    return y.astype(np.int64)


def inspect_npz(data: bytes, *, max_pixels: int, max_bytes: int) -> NpzSummary:
    """Checks an uploaded .npz as parse_npz would, streaming x in chunks: memory stays at one
    chunk beyond the upload itself, whatever the archive unpacks to."""
    with _open_npz(data, max_pixels=max_pixels, max_bytes=max_bytes) as archive:
        y = _labels(archive)
        header = archive.header("x")
        try:
            for block in archive.chunks("x"):
                if header.dtype.kind == "f" and not np.isfinite(block).all():
                    raise BadDataset("x holds NaN or infinite values")
        except npyfile.BadArray as exc:
            raise BadDataset(str(exc)) from None
        shape = header.shape if len(header.shape) == 4 else (header.shape[0], 1,
                                                             *header.shape[1:])
    return NpzSummary((shape[1], shape[2], shape[3]), y)


def parse_npz(data: bytes, *, max_pixels: int, max_bytes: int | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """An uploaded dataset: an .npz with `x` (N, C, H, W) or (N, H, W) and integer `y` (N,).
    Never unpickles; sizes are checked from the headers before anything is decompressed
    (convoy.npyfile). `max_bytes` defaults to the max_dataset_bytes setting."""
    if max_bytes is None:
        from convoy.settings import get_settings

        max_bytes = get_settings().max_dataset_bytes
    with _open_npz(data, max_pixels=max_pixels, max_bytes=max_bytes) as archive:
        y = _labels(archive)
        try:
            x = archive.load("x")
        except npyfile.BadArray as exc:
            raise BadDataset(str(exc)) from None
    if x.ndim == 3:
        x = x[:, None]
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise BadDataset("x holds NaN or infinite values")
    return x, y


def parse_presplit(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> Split:
    """A stored image-folder dataset: an .npz with x, y (training) and x_val, y_val (its
    val/ or test/ folder), each pair checked as parse_npz checks x and y."""
    if max_bytes is None:
        from convoy.settings import get_settings

        max_bytes = get_settings().max_dataset_bytes
    try:
        archive = npyfile.Npz(data, ("x", "y", "x_val", "y_val"), max_bytes=max_bytes)
    except npyfile.BadArray as exc:
        raise BadDataset(str(exc), status=exc.status) from None
    with archive:
        try:
            arrays = [archive.load(n) for n in ("x", "y", "x_val", "y_val")]
        except npyfile.BadArray as exc:
            raise BadDataset(str(exc)) from None
    x, y, x_val, y_val = arrays
    if x.ndim != 4 or x_val.ndim != 4 or x.shape[1:] != x_val.shape[1:] \
            or x.shape[2] * x.shape[3] > max_pixels:
        raise BadDataset(f"x {list(x.shape)} and x_val {list(x_val.shape)} must be (N, C, H, W)"
                         " of the same image shape")
    if y.shape != (len(x),) or y_val.shape != (len(x_val),):
        raise BadDataset("y and y_val must label every image of x and x_val")
    return Split(x.astype(np.float32, copy=False), y.astype(np.int64),
                 x_val.astype(np.float32, copy=False), y_val.astype(np.int64))


def split_uploaded(x: np.ndarray, y: np.ndarray) -> Split:
    if len(np.unique(y)) * 2 > len(y):
        rng = np.random.default_rng(0)
        idx = rng.permutation(len(y))
        cut = max(1, len(y) // 5)
        return Split(x[idx[cut:]], y[idx[cut:]], x[idx[:cut]], y[idx[:cut]])
    return _stratified_split(x, y, 0.2, seed=0)


def describe(ref_data: dict[str, Any]) -> str:
    return ref_data.get("name") or f"upload {ref_data.get('id')}"
