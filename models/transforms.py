"""The input transforms of invariance jobs, as batched tensor ops (docs/invariance.md defines
them): translation by whole pixels with zero fill (exact, no interpolation), rotation about
the image centre and scaling about it (bilinear, zero fill).

affine_grid/grid_sample run with align_corners=False: the normalised coordinates -1 and 1 are
the outer edges of the border pixels, so the centre of the image is the centre of rotation
and scaling for even and odd sizes alike, and a rotation by 180 degrees or a scaling by 1 puts
every pixel centre exactly on a pixel centre."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# (dx, dy) per pixel of translation: right, left, down (rows grow downward), up
DIRECTIONS = ((1, 0), (-1, 0), (0, 1), (0, -1))


@dataclass(frozen=True)
class Transform:
    """One transformed copy: `family` at `magnitude`, its `variant` (a direction, or the sign
    of a rotation)."""

    family: str
    magnitude: float
    variant: int = 0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.family == "translate":
            dx, dy = DIRECTIONS[self.variant]
            k = int(self.magnitude)
            return translate(x, dx * k, dy * k)
        if self.family == "rotate":
            return rotate(x, self.magnitude if self.variant == 0 else -self.magnitude)
        if self.family == "scale":
            return scale(x, self.magnitude)
        raise ValueError(f"unknown transform {self.family!r}")


def variants(family: str, magnitude: float) -> list[Transform]:
    """The copies one magnitude is measured on: four directions, +θ and -θ, or one scaling."""
    count = {"translate": len(DIRECTIONS), "rotate": 2, "scale": 1}[family]
    return [Transform(family, magnitude, v) for v in range(count)]


def translate(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """[N, C, H, W] moved dx pixels right (negative: left) and dy down (negative: up); what
    leaves the frame is dropped, what enters is 0."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dx) >= w or abs(dy) >= h:
        return out
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        x[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def affine(x: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """Output pixel p (normalised coordinates) takes the input at theta @ [p, 1], bilinear,
    0 outside the input."""
    t = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(t, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotation_theta(degrees: float, h: int, w: int) -> list[list[float]]:
    """Rotation by `degrees` about the centre, clockwise as displayed (rows downward), in
    pixel units: normalised x spans W/2 pixels and y H/2, hence the aspect ratios."""
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # output pixel (x, y) reads the input at R(-a) (x, y), in pixels from the centre
    return [[c, s * h / w, 0.0], [-s * w / h, c, 0.0]]


def rotate(x: torch.Tensor, degrees: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    return affine(x, rotation_theta(degrees, h, w))


def scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Scaled by `factor` about the centre: > 1 enlarges (the edges leave the frame), < 1
    shrinks (a border of zeros)."""
    return affine(x, [[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]])
