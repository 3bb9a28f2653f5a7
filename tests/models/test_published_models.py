"""Published networks, written as specs here (torchvision is not installed, and Convoy has no
presets for them), checked against their published sizes and receptive fields:

- VGG-16 (Simonyan & Zisserman 2015, configuration D; torchvision's `vgg16`): 138,357,544
  parameters; receptive field 196 at conv5_3 and 212 at pool5 (Araujo, Norris & Sim,
  "Computing Receptive Fields of Convolutional Neural Networks", Distill 2019);
- AlexNet as torchvision builds it (`alexnet`, the one-GPU variant of Krizhevsky et al.):
  61,100,840 parameters; receptive field 195 at the last max-pool;
- LeNet-5 (LeCun et al. 1998) on a 1x32x32 input: 61,706 parameters (the `lenet5` preset).

A flattened feature is still one unit of the map before it, so `flatten` keeps that layer's
receptive field; only a layer that mixes every position (a linear layer after flatten, global
pooling) sees the whole input.
"""

from __future__ import annotations

from typing import Any

import pytest

from models.spec import ModelSpec, SpecError, infer, summarize


def conv(out: int, k: int, stride: int = 1, padding: int = 0) -> dict[str, Any]:
    return {"type": "conv2d", "out_channels": out, "kernel_size": k, "stride": stride,
            "padding": padding}


def maxpool(k: int, stride: int | None = None) -> dict[str, Any]:
    return {"type": "maxpool2d", "kernel_size": k, "stride": stride or k}


RELU = {"type": "relu"}
DROPOUT = {"type": "dropout"}


def linear(n: int) -> dict[str, Any]:
    return {"type": "linear", "out_features": n}


def vgg16() -> list[dict[str, Any]]:
    """torchvision's vgg16: 13 3x3 convolutions (padding 1) in five blocks, each closed by
    a 2x2 max-pool, then AdaptiveAvgPool2d(7) and the 4096-4096-1000 classifier."""
    layers: list[dict[str, Any]] = []
    for width, convs in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
        for _ in range(convs):
            layers += [conv(width, 3, padding=1), RELU]
        layers.append(maxpool(2))
    layers += [{"type": "adaptive_avgpool2d", "output_size": 7}, {"type": "flatten"},
               linear(4096), RELU, DROPOUT, linear(4096), RELU, DROPOUT, linear(1000)]
    return layers


def alexnet() -> list[dict[str, Any]]:
    """torchvision's alexnet (features, AdaptiveAvgPool2d(6), classifier)."""
    return [
        conv(64, 11, stride=4, padding=2), RELU, maxpool(3, 2),
        conv(192, 5, padding=2), RELU, maxpool(3, 2),
        conv(384, 3, padding=1), RELU, conv(256, 3, padding=1), RELU,
        conv(256, 3, padding=1), RELU, maxpool(3, 2),
        {"type": "adaptive_avgpool2d", "output_size": 6}, {"type": "flatten"},
        DROPOUT, linear(4096), RELU, DROPOUT, linear(4096), RELU, linear(1000),
    ]


def rows_of(layers: list[dict[str, Any]], side: int = 224) -> list[dict[str, Any]]:
    spec = ModelSpec.model_validate({"input_shape": [3, side, side], "num_classes": 1000,
                                     "layers": layers})
    return infer(spec)["layers"]


def rf(row: dict[str, Any]) -> int:
    assert row["receptive_field"][0] == row["receptive_field"][1], row
    return int(row["receptive_field"][0])


def test_vgg16_parameters_and_receptive_fields() -> None:
    rows = rows_of(vgg16())
    assert sum(r["params"] for r in rows) == 138_357_544
    convs = [r for r in rows if r["type"] == "conv2d"]
    pools = [r for r in rows if r["type"] == "maxpool2d"]
    assert len(convs) == 13 and len(pools) == 5
    # Araujo et al. (Distill 2019), table for VGG-16: conv5_3 196, pool5 212
    assert rf(convs[-1]) == 196
    assert rf(pools[-1]) == 212
    assert pools[-1]["output_shape"] == [512, 7, 7]
    # the identity adaptive pool (7 -> 7) and flatten keep pool5's field: one flattened
    # feature is one unit of pool5
    adaptive, flatten = rows[-9], rows[-8]
    assert (adaptive["type"], flatten["type"]) == ("adaptive_avgpool2d", "flatten")
    assert rf(adaptive) == rf(flatten) == 212
    # fc6 mixes all 7x7 positions: it (and everything after it) sees the whole input
    assert [rf(r) for r in rows[-7:]] == [224] * 7
    assert rows[-1]["output_shape"] == [1000]


def test_vgg16_receptive_fields_per_block() -> None:
    rows = rows_of(vgg16())
    convs = [rf(r) for r in rows if r["type"] == "conv2d"]
    pools = [rf(r) for r in rows if r["type"] == "maxpool2d"]
    assert convs == [3, 5, 10, 14, 24, 32, 40, 60, 76, 92, 132, 164, 196]
    assert pools == [6, 16, 44, 100, 212]


def test_alexnet_parameters_and_receptive_fields() -> None:
    rows = rows_of(alexnet())
    assert sum(r["params"] for r in rows) == 61_100_840
    pools = [r for r in rows if r["type"] == "maxpool2d"]
    assert [rf(r) for r in pools] == [19, 67, 195]
    assert pools[-1]["output_shape"] == [256, 6, 6]
    flatten = next(r for r in rows if r["type"] == "flatten")
    assert rf(flatten) == 195
    first_linear = next(r for r in rows if r["type"] == "linear")
    assert rf(first_linear) == 224 and first_linear["params"] == 9216 * 4096 + 4096


def test_flatten_of_a_single_position_mixes_nothing() -> None:
    """A 1x1 map has one position: flatten and the linear layer after it see what that unit
    sees, not the whole input."""
    rows = infer(ModelSpec.model_validate({"input_shape": [1, 9, 9], "layers": [
        conv(2, 3, stride=3), maxpool(2), {"type": "flatten"}, linear(4)]}))["layers"]
    assert rows[1]["output_shape"] == [2, 1, 1]
    assert [rf(r) for r in rows] == [3, 6, 6, 6]


def test_global_pooling_sees_the_whole_input() -> None:
    rows = infer(ModelSpec.model_validate({"input_shape": [3, 32, 32], "layers": [
        conv(8, 3, padding=1), maxpool(2), conv(8, 3, padding=1),
        {"type": "adaptive_avgpool2d", "output_size": [1, 2]}, {"type": "flatten"},
        linear(5)]}))["layers"]
    assert [r["receptive_field"] for r in rows[:3]] == [[3, 3], [4, 4], [8, 8]]
    # output 1 on an axis: the whole input on that axis; output 2 of 16 columns: windows of
    # 8 columns at jump 2 -> 8 + 7 * 2
    assert rows[3]["receptive_field"] == [32, 22]
    assert rows[4]["receptive_field"] == [32, 22]
    assert rows[5]["receptive_field"] == [32, 32]


def test_lenet5_is_the_published_network() -> None:
    """LeNet-5 (LeCun et al. 1998) as the common re-implementations build it: 1x32x32 input,
    6 5x5 filters without padding (28x28), 2x2 average pooling (14x14), 16 5x5 filters (10x10),
    2x2 average pooling (5x5), then 120, 84 and 10 units with tanh: 61,706 parameters."""
    spec, summary = summarize({"preset": "lenet5"})
    assert spec.input_shape == [1, 32, 32]
    rows = summary["layers"]
    assert [r["output_shape"] for r in rows] == [
        [6, 28, 28], [6, 28, 28], [6, 14, 14], [16, 10, 10], [16, 10, 10], [16, 5, 5],
        [400], [120], [120], [84], [84], [10]]
    assert [r["params"] for r in rows if r["params"]] == [156, 2416, 48120, 10164, 850]
    assert summary["total_params"] == 61_706
    assert [r["type"] for r in rows if r["type"] in ("tanh", "avgpool2d")] == \
        ["tanh", "avgpool2d", "tanh", "avgpool2d", "tanh", "tanh"]
    # C3's units see 14x14 pixels and S4's 16x16; F5 (the first linear) mixes S4's 5x5 positions
    assert [rf(r) for r in rows[:7]] == [5, 5, 6, 14, 14, 16, 16]
    assert rf(rows[7]) == 32


def test_lenet5_padded_keeps_the_old_padded_network() -> None:
    """`lenet5-padded` pads both convolutions by 2, so it also fits the 8x8 digits."""
    spec, summary = summarize({"preset": "lenet5-padded", "input_shape": [1, 8, 8]})
    assert [r["output_shape"] for r in summary["layers"]][:6] == [
        [6, 8, 8], [6, 8, 8], [6, 4, 4], [16, 4, 4], [16, 4, 4], [16, 2, 2]]
    assert summary["total_params"] == 156 + 2416 + 64 * 120 + 120 + 120 * 84 + 84 + 850
    _, on_32 = summarize({"preset": "lenet5-padded", "input_shape": [1, 32, 32]})
    assert on_32["total_params"] == 136_586
    spec, on_28 = summarize({"preset": "lenet5-padded"})
    assert spec.input_shape == [1, 28, 28]
    assert on_28["layers"][6]["output_shape"] == [16 * 7 * 7]
    assert on_28["total_params"] == 107_786


def test_lenet5_does_not_fit_the_8x8_digits() -> None:
    """The published network needs 32x32 (or at least 16x16) inputs: on 8x8 its second
    convolution has nothing to slide over, and the error says so."""
    with pytest.raises(SpecError, match="layer 3 .conv2d.: window 5 is larger"):
        summarize({"preset": "lenet5", "input_shape": [1, 8, 8]})
