"""Named specs: `{"preset": "lenet5"}` and `{"preset": "vgg-small"}`, sized to any input; and
`digits_cnn()`, the small CNN on scikit-learn's 8x8 digits that the worker's warm-up, the
benches and the tests share (a spec to pass, not a preset name the API accepts)."""

from __future__ import annotations

from typing import Any


def _conv(out: int, k: int = 3, p: int = 1) -> dict[str, Any]:
    return {"type": "conv2d", "out_channels": out, "kernel_size": k, "padding": p}


def digits_cnn(channels: int = 16, *, input_shape: tuple[int, int, int] = (1, 8, 8),
               num_classes: int = 10) -> dict[str, Any]:
    """A full spec: one 3x3 conv of `channels` filters, ReLU, 2x2 max-pool, linear."""
    return {
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "layers": [
            _conv(channels), {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"}, {"type": "linear", "out_features": num_classes},
        ],
    }


def lenet5(num_classes: int) -> list[dict[str, Any]]:
    # LeNet-5's shape (6 then 16 filters of 5x5, subsampling, 120-84-classes), padded so
    # that it also fits the 8x8 digits.
    return [
        _conv(6, 5, 2), {"type": "tanh"}, {"type": "avgpool2d", "kernel_size": 2},
        _conv(16, 5, 2), {"type": "tanh"}, {"type": "avgpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 120}, {"type": "tanh"},
        {"type": "linear", "out_features": 84}, {"type": "tanh"},
        {"type": "linear", "out_features": num_classes},
    ]


def vgg_small(num_classes: int) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for width in (32, 64, 128):
        for _ in range(2):
            layers += [_conv(width), {"type": "batchnorm2d"}, {"type": "relu"}]
        layers.append({"type": "maxpool2d", "kernel_size": 2})
    layers += [{"type": "adaptive_avgpool2d", "output_size": 1}, {"type": "flatten"},
               {"type": "linear", "out_features": num_classes}]
    return layers


PRESETS = {
    "lenet5": (lenet5, [1, 32, 32]),
    "vgg-small": (vgg_small, [3, 32, 32]),
}


def expand_preset(data: dict[str, Any]) -> dict[str, Any]:
    name = data["preset"]
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    build, default_shape = PRESETS[name]
    num_classes = data.get("num_classes")
    if num_classes is None:
        num_classes = 10
    # a bad num_classes (0, "many") is reported on that field alone, not on the layers too
    width = num_classes if type(num_classes) is int and num_classes >= 1 else 10
    shape = data.get("input_shape")
    return {**data, "input_shape": default_shape if shape is None else shape,
            "num_classes": num_classes, "layers": build(width)}
