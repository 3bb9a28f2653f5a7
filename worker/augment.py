"""Training-batch augmentation on the training device, for a whole batch at once: every
random choice is one tensor drawn from a torch.Generator seeded from (seed, epoch), and every
image is moved by one gather, so there is no loop over images and a resumed run draws the
same augmentations as one that never stopped."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from convoy.jobspec import Augment

# keeps the augmentation's draws apart from the shuffling's and dropout's (the epoch seed)
AUGMENT_SALT = 0x5EED_A06


def augment_generator(device: torch.device, epoch_seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((epoch_seed ^ AUGMENT_SALT) % (2**63))
    return generator


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, mode: str
          ) -> torch.Tensor:
    """Each image n moved down by dy[n] and right by dx[n] pixels (|d| <= pad); the border
    it uncovers is zeros (mode "constant") or its edge pixels repeated ("replicate")."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    rows = (pad - dy)[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = (pad - dx)[:, None] + torch.arange(w, device=x.device)  # (N, W)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """random_crop (zero padding, then a random window of the input's size), translate (edge
    padding), hflip, in that order, each drawn per image."""
    n = x.shape[0]
    dev = x.device
    if x.dim() != 4 or n == 0:
        return x
    if aug.random_crop is not None:
        p = aug.random_crop.padding
        d = torch.randint(-p, p + 1, (2, n), device=dev, generator=generator)
        x = shift(x, d[0], d[1], p, "constant")
    if aug.translate:
        t = aug.translate
        d = torch.randint(-t, t + 1, (2, n), device=dev, generator=generator)
        x = shift(x, d[0], d[1], t, "replicate")
    if aug.hflip:
        flip = torch.rand(n, device=dev, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x
