"""Build a torch module from a spec. Parameters are named `layers.{i}.*` after the spec's
layer index, so a checkpoint made outside Convoy loads by the same names."""

from __future__ import annotations

import torch
from torch import nn

from models.spec import ModelSpec, pair


def build_layer(layer, in_shape: tuple[int, ...]) -> nn.Module:  # noqa: ANN001
    t = layer.type
    if t == "conv2d":
        return nn.Conv2d(in_shape[0], layer.out_channels, pair(layer.kernel_size),
                         stride=pair(layer.stride), padding=pair(layer.padding),
                         dilation=pair(layer.dilation), groups=layer.groups, bias=layer.bias)
    if t == "maxpool2d":
        stride = pair(layer.stride if layer.stride is not None else layer.kernel_size)
        return nn.MaxPool2d(pair(layer.kernel_size), stride=stride, padding=pair(layer.padding),
                            dilation=pair(layer.dilation), ceil_mode=layer.ceil_mode)
    if t == "avgpool2d":
        stride = pair(layer.stride if layer.stride is not None else layer.kernel_size)
        return nn.AvgPool2d(pair(layer.kernel_size), stride=stride, padding=pair(layer.padding),
                            ceil_mode=layer.ceil_mode, count_include_pad=layer.count_include_pad)
    if t == "adaptive_avgpool2d":
        return nn.AdaptiveAvgPool2d(pair(layer.output_size))
    if t == "batchnorm2d":
        return nn.BatchNorm2d(in_shape[0], eps=layer.eps, momentum=layer.momentum)
    if t == "linear":
        return nn.Linear(in_shape[0], layer.out_features, bias=layer.bias)
    if t == "leaky_relu":
        return nn.LeakyReLU(layer.negative_slope)
    if t == "dropout":
        return nn.Dropout(layer.p)
    simple = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
              "flatten": lambda: nn.Flatten(1)}
    return simple[t]()


class ConvNet(nn.Module):
    def __init__(self, spec: ModelSpec, summary: dict) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList(
            build_layer(layer, tuple(row["input_shape"]))
            for layer, row in zip(spec.layers, summary["layers"], strict=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def build_model(spec: ModelSpec) -> ConvNet:
    from models.spec import infer

    return ConvNet(spec, infer(spec))
