"""Named specs: `{"preset": "lenet5"}` (the published LeNet-5, 1x32x32), `"lenet5-padded"`
`"vgg-small"` and `"resnet-small"`, sized to any input that fits; and
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


def _lenet5(num_classes: int, padding: int) -> list[dict[str, Any]]:
    return [
        _conv(6, 5, padding), {"type": "tanh"}, {"type": "avgpool2d", "kernel_size": 2},
        _conv(16, 5, padding), {"type": "tanh"}, {"type": "avgpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "out_features": 120}, {"type": "tanh"},
        {"type": "linear", "out_features": 84}, {"type": "tanh"},
        {"type": "linear", "out_features": num_classes},
    ]


def lenet5(num_classes: int) -> list[dict[str, Any]]:
    """LeNet-5 (LeCun et al. 1998) as the common re-implementations build it, on 1x32x32:
    C1 6 5x5 filters (28x28), S2 2x2 average pooling (14x14), C3 16 5x5 filters (10x10),
    S4 2x2 average pooling (5x5), F5 120, F6 84, output `num_classes`; tanh after C1, C3, F5
    and F6. 61,706 parameters with 10 classes. Average pooling and tanh follow the paper
    (subsampling by averaging, a squashing function). Where the paper differs, this takes the
    usual simplification, which is what the 61,706 count: S2 and S4 have no trainable
    coefficient and bias, C3 connects to all six S2 maps (the paper's table connects each to
    3 to 6), and the output is a linear layer, not Euclidean RBF units."""
    return _lenet5(num_classes, padding=0)


def lenet5_padded(num_classes: int) -> list[dict[str, Any]]:
    """LeNet-5 with both convolutions padded by 2, so a 28x28 input keeps its size through
    C1 (the variant many MNIST tutorials train) and even the 8x8 digits fit. 136,586
    parameters on 1x32x32, 107,786 on 1x28x28 (10 classes)."""
    return _lenet5(num_classes, padding=2)


def vgg_small(num_classes: int) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for width in (32, 64, 128):
        for _ in range(2):
            layers += [_conv(width), {"type": "batchnorm2d"}, {"type": "relu"}]
        layers.append({"type": "maxpool2d", "kernel_size": 2})
    layers += [{"type": "adaptive_avgpool2d", "output_size": 1}, {"type": "flatten"},
               {"type": "linear", "out_features": num_classes}]
    return layers


def _basic_block(width: int, stride: int, projection: bool) -> dict[str, Any]:
    conv = {"type": "conv2d", "out_channels": width, "kernel_size": 3, "padding": 1,
            "bias": False}
    return {"type": "residual", "shortcut": "projection" if projection else "identity",
            "layers": [{**conv, "stride": stride}, {"type": "batchnorm2d"}, {"type": "relu"},
                       conv, {"type": "batchnorm2d"}]}


def resnet_small(num_classes: int) -> list[dict[str, Any]]:
    """A CIFAR-style ResNet (He et al. 2016, section 4.2, with n = 2: 14 weighted layers):
    a 3x3 convolution of 16 filters, then 3 stages of 2 basic blocks (two 3x3 convolutions
    with batch norm, ReLU after the sum) of 16, 32 and 64 filters, the 2nd and 3rd stage
    halving the map with a stride-2 first convolution and a projection shortcut (the paper's
    option B: 1x1 convolution + batch norm), global average pooling and a linear layer.
    175,258 parameters with 10 classes."""
    layers: list[dict[str, Any]] = [
        {"type": "conv2d", "out_channels": 16, "kernel_size": 3, "padding": 1, "bias": False},
        {"type": "batchnorm2d"}, {"type": "relu"}]
    for stage, width in enumerate((16, 32, 64)):
        for block in range(2):
            down = stage > 0 and block == 0
            layers += [_basic_block(width, 2 if down else 1, down), {"type": "relu"}]
    layers += [{"type": "adaptive_avgpool2d", "output_size": 1}, {"type": "flatten"},
               {"type": "linear", "out_features": num_classes}]
    return layers


PRESETS = {
    "lenet5": (lenet5, [1, 32, 32]),
    "lenet5-padded": (lenet5_padded, [1, 28, 28]),
    "vgg-small": (vgg_small, [3, 32, 32]),
    "resnet-small": (resnet_small, [3, 32, 32]),
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
