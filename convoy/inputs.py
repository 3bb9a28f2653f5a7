"""Inputs for feature-map jobs: uploaded .npy arrays and PNG/JPEG images, checked at upload
(API) and turned into the model's input shape at run time (worker). Numpy and Pillow only.

The image rule: first frame, EXIF orientation applied, converted to greyscale ("L") for a
1-channel model or RGB for a 3-channel model, resized to exactly H x W with bilinear
filtering (the aspect ratio is not kept), scaled from 0..255 to 0..1 as float32.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np

IMAGE_FORMATS = ("PNG", "JPEG")
MAX_INPUTS = 4096


class BadInput(ValueError):
    """An upload that cannot be used; `status` is 413 for a too-large image, else 422."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def sniff(data: bytes) -> str:
    if data[:6] == b"\x93NUMPY":
        return "npy"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    raise BadInput("not a .npy array, a PNG or a JPEG image")


def parse_npy(data: bytes, *, max_pixels: int, max_bytes: int | None = None) -> np.ndarray:
    """(N, C, H, W) float32 from a .npy file; (N, H, W) gets C = 1. Never unpickles. The
    header's shape and dtype are checked against the file's length and the limits before the
    data is read (`max_bytes`, for the float32 result, defaults to max_dataset_bytes)."""
    from convoy import npyfile

    if max_bytes is None:
        from convoy.settings import get_settings

        max_bytes = get_settings().max_dataset_bytes
    try:
        header = npyfile.npy_header(data, "the array")
    except npyfile.BadArray as exc:
        raise BadInput(str(exc)) from None
    shape = header.shape
    if len(shape) in (3, 4) and (shape[-1] * shape[-2] > max_pixels
                                 or (len(shape) == 4 and shape[1] > 64)):
        raise BadInput(f"inputs of {list(shape[1:])} are larger than allowed (max_image_pixels="
                       f"{max_pixels}, at most 64 channels)", status=413)
    if math.prod(shape) * 4 > max_bytes:
        raise BadInput(f"the array {list(shape)} takes {math.prod(shape) * 4} bytes as float32, "
                       f"over max_dataset_bytes={max_bytes}", status=413)
    try:
        x = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # object arrays (pickles), truncated headers
        raise BadInput(f"not a readable .npy without pickles: {exc}") from None
    if not isinstance(x, np.ndarray):
        raise BadInput("not a single .npy array")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise BadInput(f"the array must have shape (N, C, H, W) or (N, H, W); got {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise BadInput(f"the array must be real numbers; got dtype {x.dtype}")
    n, c, h, w = x.shape
    if n < 1 or n > MAX_INPUTS:
        raise BadInput(f"{n} inputs; between 1 and {MAX_INPUTS} per upload")
    if h * w > max_pixels or c > 64:
        raise BadInput(f"inputs of {[c, h, w]} are larger than allowed (max_image_pixels="
                       f"{max_pixels}, at most 64 channels)", status=413)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise BadInput("the array holds NaN or infinite values")
    return x


def open_image(data: bytes, *, max_pixels: int) -> Any:
    """A decoded Pillow image, refusing decompression bombs before the pixels are inflated."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            width, height = image.size
            # The header alone gives the size: refuse before load() allocates width*height.
            if width * height > max_pixels:
                raise BadInput(f"image of {width}x{height} = {width * height} pixels exceeds "
                               f"max_image_pixels={max_pixels}", status=413)
            image.load()
    except BadInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadInput(f"image too large in pixels: {exc}", status=413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadInput(f"the image cannot be decoded: {exc}") from None
    return image


def image_meta(data: bytes, *, max_pixels: int) -> dict[str, Any]:
    image = open_image(data, max_pixels=max_pixels)
    return {"format": image.format.lower(), "width": image.size[0], "height": image.size[1],
            "mode": image.mode, "count": 1}


def image_to_array(data: bytes, shape: tuple[int, int, int] | list[int], *,
                   max_pixels: int) -> np.ndarray:
    """One image as a (1, C, H, W) float32 array in 0..1, by the rule in the module docstring."""
    from PIL import Image, ImageOps

    c, h, w = shape
    if c not in (1, 3):
        raise BadInput(f"images convert to 1 or 3 channels; the model wants {c}")
    image = open_image(data, max_pixels=max_pixels)
    image.seek(0)
    image = ImageOps.exif_transpose(image).convert("L" if c == 1 else "RGB")
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = x[None] if c == 1 else x.transpose(2, 0, 1)
    return np.ascontiguousarray(x[None])
