"""Augmentation: what each transform does, reproducibility from the seed, and that it helps
on a task built so that translation matters."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from convoy.datasets import Split
from convoy.jobspec import Augment, TrainConfig
from models.build import build_model
from models.spec import ModelSpec
from worker.augment import augment_batch, augment_generator, shift
from worker.train import DeviceData, epoch_seed, train


def test_shift_moves_each_image_by_its_own_offset():
    x = torch.randn(3, 2, 6, 7)
    dy, dx = torch.tensor([2, 0, -1]), torch.tensor([-3, 1, 0])
    zeros = shift(x, dy, dx, 3, "constant")
    edges = shift(x, dy, dx, 3, "replicate")
    for n in range(3):
        a, b = int(dy[n]), int(dx[n])
        padded = torch.nn.functional.pad(x[n], (3, 3, 3, 3))
        want = padded[:, 3 - a:3 - a + 6, 3 - b:3 - b + 7]
        assert torch.equal(zeros[n], want)
        # replicate: the edge fills the uncovered border
        rows = torch.clamp(torch.arange(6) - a, 0, 5)
        cols = torch.clamp(torch.arange(7) - b, 0, 6)
        assert torch.equal(edges[n], x[n][:, rows][:, :, cols])


def test_hflip_flips_about_half_and_crop_keeps_the_pixels_multiset_or_zeros():
    x = torch.rand(512, 1, 8, 8) + 1  # no zeros in the input
    gen = augment_generator(torch.device("cpu"), 7)
    flipped = augment_batch(x, Augment(hflip=True), gen)
    same = (flipped == x).flatten(1).all(1)
    mirrored = (flipped == x.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 180 < int(mirrored.sum()) < 330
    cropped = augment_batch(x, Augment.model_validate({"random_crop": {"padding": 2}}), gen)
    assert cropped.shape == x.shape
    # every value is zero (padding) or one of the image's own
    for n in range(8):
        kept = cropped[n][cropped[n] != 0]
        assert bool(torch.isin(kept, x[n]).all())
    moved = (cropped != x).flatten(1).any(1).float().mean()
    assert moved > 0.7  # 1 - 1/25 of them move


def test_the_same_seed_gives_the_same_augmented_batches():
    aug = Augment.model_validate({"random_crop": {"padding": 4}, "hflip": True, "translate": 2})
    x = torch.randn(64, 3, 32, 32)

    def batches(seed: int, epoch0: int) -> list[torch.Tensor]:
        gen = augment_generator(x.device, epoch_seed(seed, epoch0))
        return [augment_batch(x[i:i + 16], aug, gen) for i in range(0, 64, 16)]

    first, again = batches(3, 0), batches(3, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(4, 0), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(3, 1), strict=True))
    assert not torch.equal(first[0], x[:16])


def translated_task(seed: int = 0, train_n: int = 600, val_n: int = 400
                    ) -> tuple[Split, list[int]]:
    """4 classes, each a fixed random 5x5 binary pattern on 16x16 noise. Training images
    hold the pattern at the centre; validation images anywhere within +-3 pixels of it. A
    model without pooling learns the position with the pattern, so only training with
    shifted copies carries it to the shifted validation images."""
    rng = np.random.default_rng(seed)
    patterns = (rng.random((4, 5, 5)) < 0.5).astype(np.float32)

    def images(n: int, spread: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 4, n)
        x = rng.normal(0, 0.3, (n, 1, 16, 16)).astype(np.float32)
        offsets = rng.integers(-spread, spread + 1, (n, 2))
        for i in range(n):
            top, left = 5 + offsets[i, 0], 5 + offsets[i, 1]
            x[i, 0, top:top + 5, left:left + 5] += patterns[y[i]]
        return x, y.astype(np.int64)

    x_train, y_train = images(train_n, 0)
    x_val, y_val = images(val_n, 3)
    return Split(x_train, y_train, x_val, y_val), [1, 16, 16]


def val_accuracy(augment: dict[str, Any] | None) -> float:
    split, shape = translated_task()
    spec = ModelSpec.model_validate({"input_shape": shape, "num_classes": 4, "layers": [
        {"type": "conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "relu"}, {"type": "flatten"}, {"type": "linear", "out_features": 4}]})
    cfg = TrainConfig.model_validate({"epochs": 12, "batch_size": 32, "lr": 0.02, "seed": 1,
                                      "augment": augment})
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    result = train(model, DeviceData.from_numpy(split, torch.device("cpu")), cfg)
    return float(result["val_accuracy"])


def test_translate_augmentation_raises_validation_accuracy_on_shifted_images():
    plain = val_accuracy(None)
    shifted = val_accuracy({"translate": 3})
    cropped = val_accuracy({"random_crop": {"padding": 3}})
    print(f"val accuracy: none {plain:.3f}, translate 3 {shifted:.3f}, "
          f"random_crop 3 {cropped:.3f}")
    assert shifted > plain + 0.2
    assert cropped > plain + 0.2
