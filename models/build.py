"""Build a torch module from a spec. Parameters are named `layers.{i}.*` after the spec's
layer index, so a checkpoint made outside Convoy loads by the same names."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.spec import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    BlockLayer,
    Conv2d,
    Dropout,
    Flatten,
    Layer,
    LeakyReLU,
    Linear,
    MaxPool2d,
    ModelSpec,
    Residual,
    pair,
)


class ResidualBlock(nn.Module):
    """y = layers(x) + shortcut(x); parameters are named `layers.{j}.*` after the inner
    layer's index and `shortcut.0.*` (the 1x1 convolution), `shortcut.1.*` (its batch norm)."""

    def __init__(self, block: Residual, row: dict[str, Any]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            build_layer(layer, tuple(inner["input_shape"]))
            for layer, inner in zip(block.layers, row["layers"], strict=True))
        shortcut = row["shortcut"]
        if shortcut["type"] == "projection":
            c_in, c_out = row["input_shape"][0], row["output_shape"][0]
            bn = bool(shortcut["batchnorm"])
            parts: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, stride=tuple(shortcut["stride"]),
                                                bias=not bn)]
            if bn:
                parts.append(nn.BatchNorm2d(c_out))
            self.shortcut: nn.Module = nn.Sequential(*parts)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        for layer in self.layers:
            y = layer(y)
        return y + self.shortcut(x)


def build_layer(layer: Layer | BlockLayer, in_shape: tuple[int, ...]) -> nn.Module:
    if isinstance(layer, Conv2d):
        return nn.Conv2d(in_shape[0], layer.out_channels, pair(layer.kernel_size),
                         stride=pair(layer.stride), padding=pair(layer.padding),
                         dilation=pair(layer.dilation), groups=layer.groups, bias=layer.bias)
    if isinstance(layer, MaxPool2d):
        stride = pair(layer.stride if layer.stride is not None else layer.kernel_size)
        return nn.MaxPool2d(pair(layer.kernel_size), stride=stride, padding=pair(layer.padding),
                            dilation=pair(layer.dilation), ceil_mode=layer.ceil_mode)
    if isinstance(layer, AvgPool2d):
        stride = pair(layer.stride if layer.stride is not None else layer.kernel_size)
        return nn.AvgPool2d(pair(layer.kernel_size), stride=stride, padding=pair(layer.padding),
                            ceil_mode=layer.ceil_mode, count_include_pad=layer.count_include_pad)
    if isinstance(layer, AdaptiveAvgPool2d):
        return nn.AdaptiveAvgPool2d(pair(layer.output_size))
    if isinstance(layer, BatchNorm2d):
        return nn.BatchNorm2d(in_shape[0], eps=layer.eps, momentum=layer.momentum)
    if isinstance(layer, Linear):
        return nn.Linear(in_shape[0], layer.out_features, bias=layer.bias)
    if isinstance(layer, LeakyReLU):
        return nn.LeakyReLU(layer.negative_slope)
    if isinstance(layer, Dropout):
        return nn.Dropout(layer.p)
    if isinstance(layer, Flatten):
        return nn.Flatten(1)
    simple: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh,
                                          "sigmoid": nn.Sigmoid}
    return simple[layer.type]()


class ConvNet(nn.Module):
    def __init__(self, spec: ModelSpec, summary: dict[str, Any]) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(
            ResidualBlock(layer, row) if isinstance(layer, Residual)
            else build_layer(layer, tuple(row["input_shape"]))
            for layer, row in zip(spec.layers, summary["layers"], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_model(spec: ModelSpec) -> ConvNet:
    from models.spec import infer

    return ConvNet(spec, infer(spec))
