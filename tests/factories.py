"""Factories for the objects tests submit: specs and job requests."""

from __future__ import annotations

from typing import Any


def small_cnn(channels: int = 16, *, input_shape: tuple[int, int, int] = (1, 8, 8),
              num_classes: int = 10) -> dict[str, Any]:
    return {
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "layers": [
            {"type": "conv2d", "out_channels": channels, "kernel_size": 3, "padding": 1},
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "out_features": num_classes},
        ],
    }


def train_request(epochs: int = 3, *, model: dict[str, Any] | None = None,
                  dataset: dict[str, Any] | None = None, **train: Any) -> dict[str, Any]:
    return {
        "kind": "train",
        "name": "digits-cnn",
        "model": model or small_cnn(),
        "dataset": dataset or {"name": "digits"},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                  "momentum": 0.9, "seed": 0, **train},
        "device": "cpu",
    }
