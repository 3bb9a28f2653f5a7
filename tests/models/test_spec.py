"""models.spec in plain Python: DESIGN.md's worked examples, presets, and every way a spec
can be wrong, each refused with the layer index and the reason."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from models.spec import ModelSpec, SpecError, infer, summarize


def spec(input_shape: list[int], *layers: dict[str, Any], num_classes: int | None = None
         ) -> ModelSpec:
    return ModelSpec.model_validate({"input_shape": input_shape, "num_classes": num_classes,
                                     "layers": list(layers)})


def conv(out: int, k: Any = 3, **kw: Any) -> dict[str, Any]:
    return {"type": "conv2d", "out_channels": out, "kernel_size": k, **kw}


def test_design_example_5x5x3_padding_1_two_filters_stride_2_gives_3x3x2():
    s = infer(spec([3, 5, 5], conv(2, 3, stride=2, padding=1)))
    (row,) = s["layers"]
    assert row["output_shape"] == [2, 3, 3]
    # a 3x3x3 filter has 27 weights and 1 bias
    assert row["params"] == 2 * (27 + 1)
    # each output value: 27 multiply-adds
    assert row["flops"] == 2 * 27 * (2 * 3 * 3)
    assert row["receptive_field"] == [3, 3]


def test_fully_connected_256x256x3_to_1000_units_has_196_609_000_params():
    s = infer(spec([3, 256, 256], {"type": "flatten"}, {"type": "linear", "out_features": 1000}))
    assert s["layers"][1]["params"] == 196_609_000
    assert s["layers"][1]["fc_equivalent_params"] == 196_609_000
    assert s["fully_connected_equivalent"] == {"input_features": 196_608, "units": 1000,
                                               "params": 196_609_000}
    assert s["total_params"] == 196_609_000


def test_convolution_shares_weights_where_a_dense_layer_would_not():
    s = infer(spec([3, 256, 256], conv(1, 3, padding=1)))
    row = s["layers"][0]
    assert row["params"] == 28
    assert row["output_shape"] == [1, 256, 256]
    units = 256 * 256
    assert row["fc_equivalent_params"] == 3 * 256 * 256 * units + units
    assert s["fully_connected_equivalent"]["units"] == units


def test_params_and_receptive_fields_of_a_small_known_net():
    s = infer(spec(
        [1, 16, 16],
        conv(4, 3, padding=1), {"type": "relu"}, {"type": "maxpool2d", "kernel_size": 2},
        conv(8, 3, padding=1), {"type": "batchnorm2d"}, {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        conv(8, 3, dilation=2, padding=2),
        {"type": "flatten"}, {"type": "dropout"}, {"type": "linear", "out_features": 10},
        num_classes=10,
    ))
    rows = s["layers"]
    assert [r["output_shape"] for r in rows] == [
        [4, 16, 16], [4, 16, 16], [4, 8, 8], [8, 8, 8], [8, 8, 8], [8, 8, 8], [8, 4, 4],
        [8, 4, 4], [128], [128], [10]]
    assert [r["params"] for r in rows] == [
        4 * 9 + 4, 0, 0, 8 * 4 * 9 + 8, 16, 0, 0, 8 * 8 * 9 + 8, 0, 0, 128 * 10 + 10]
    assert s["total_params"] == sum(r["params"] for r in rows)
    # rf_l = rf_{l-1} + (span - 1) * jump_{l-1}; jump_l = jump_{l-1} * stride
    assert [r["receptive_field"][0] for r in rows[:8]] == [3, 3, 4, 8, 8, 8, 10, 10 + 4 * 4]
    assert [r["jump"][0] for r in rows[:8]] == [1, 1, 2, 2, 2, 2, 4, 4]
    # a flattened feature is one unit of the map before it; the linear layer mixes all 4x4
    # positions, so it sees the whole image
    assert rows[8]["receptive_field"] == rows[9]["receptive_field"] == [26, 26]
    assert rows[10]["receptive_field"] == [16, 16]
    assert s["output_shape"] == [10]


def test_rectangular_kernels_strides_and_ceil_mode():
    s = infer(spec([2, 7, 10], conv(4, [3, 1], stride=[2, 1], padding=[1, 0]),
                   {"type": "maxpool2d", "kernel_size": 2, "ceil_mode": True},
                   {"type": "avgpool2d", "kernel_size": [1, 3], "stride": [1, 2]}))
    assert [r["output_shape"] for r in s["layers"]] == [[4, 4, 10], [4, 2, 5], [4, 2, 2]]
    assert s["layers"][0]["params"] == 4 * 2 * 3 + 4


LENET_LAYERS_32 = [[6, 28, 28], [6, 28, 28], [6, 14, 14], [16, 10, 10], [16, 10, 10],
                   [16, 5, 5], [400], [120], [120], [84], [84], [10]]
PADDED_LAYERS_28 = [[6, 28, 28], [6, 28, 28], [6, 14, 14], [16, 14, 14], [16, 14, 14],
                    [16, 7, 7], [784], [120], [120], [84], [84], [10]]
PADDED_LAYERS_8 = [[6, 8, 8], [6, 8, 8], [6, 4, 4], [16, 4, 4], [16, 4, 4],
                   [16, 2, 2], [64], [120], [120], [84], [84], [10]]
HEAD = 120 * 84 + 84 + 84 * 10 + 10


@pytest.mark.parametrize(("preset", "input_shape", "default", "shapes", "total"), [
    ("lenet5", None, [1, 32, 32], LENET_LAYERS_32, 156 + 2416 + 400 * 120 + 120 + HEAD),
    ("lenet5-padded", None, [1, 28, 28], PADDED_LAYERS_28,
     156 + 2416 + 784 * 120 + 120 + HEAD),
    ("lenet5-padded", [1, 8, 8], None, PADDED_LAYERS_8, 156 + 2416 + 64 * 120 + 120 + HEAD),
])
def test_lenet5_presets(preset, input_shape, default, shapes, total):
    raw: dict[str, Any] = {"preset": preset}
    if input_shape:
        raw["input_shape"] = input_shape
    model, s = summarize(raw)
    assert model.input_shape == (input_shape or default)
    assert [r["output_shape"] for r in s["layers"]] == shapes
    assert s["total_params"] == total
    assert s["num_classes"] == 10


def _vgg_total(c_in: int) -> int:
    total, c = 0, c_in
    for width in (32, 32, 64, 64, 128, 128):
        total += c * 9 * width + width + 2 * width  # conv + batchnorm
        c = width
    return total + 128 * 10 + 10


@pytest.mark.parametrize(("input_shape", "sides"), [
    (None, [32, 16, 8, 4]), ([1, 8, 8], [8, 4, 2, 1]),
])
def test_vgg_small_preset(input_shape, sides):
    raw: dict[str, Any] = {"preset": "vgg-small"}
    if input_shape:
        raw["input_shape"] = input_shape
    model, s = summarize(raw)
    c_in = model.input_shape[0]
    assert model.input_shape == (input_shape or [3, 32, 32])
    rows = s["layers"]
    pools = [r for r in rows if r["type"] == "maxpool2d"]
    convs = [r for r in rows if r["type"] == "conv2d"]
    assert [r["output_shape"][1] for r in convs[::2]] == sides[:3]
    assert [r["output_shape"] for r in pools] == [[32, sides[1], sides[1]],
                                                  [64, sides[2], sides[2]],
                                                  [128, sides[3], sides[3]]]
    assert s["output_shape"] == [10]
    assert s["total_params"] == _vgg_total(c_in)


def test_preset_with_num_classes_and_unknown_preset():
    _, s = summarize({"preset": "lenet5", "num_classes": 3})
    assert s["output_shape"] == [3]
    with pytest.raises(ValidationError, match="unknown preset 'resnet'"):
        ModelSpec.model_validate({"preset": "resnet"})


@pytest.mark.parametrize(("raw", "field"), [
    ({"preset": ["lenet5"]}, "preset"),  # was a TypeError (unhashable), so a 500
    ({"preset": {"name": "lenet5"}}, "preset"),
    ({"preset": "lenet5", "num_classes": 0}, "num_classes"),  # was silently 10
    ({"preset": "lenet5", "num_classes": "many"}, "num_classes"),
    ({"preset": "vgg-small", "input_shape": []}, "input_shape"),  # was silently [3, 32, 32]
])
def test_bad_preset_fields_are_validation_errors_on_that_field(raw, field):
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate(raw)
    assert info.value.errors()[0]["loc"] == (field,)
    if field == "num_classes":
        assert [e["loc"] for e in info.value.errors()] == [(field,)]


# --- invalid specs: each names the layer index and the reason --------------------------------

INVALID: list[tuple[str, list[int], list[dict[str, Any]], int | None, int, str]] = [
    ("window larger than padded input", [1, 4, 4],
     [conv(2, 7, padding=1)], None, 0, "window 7 is larger than its padded input 6"),
    ("dilated window larger than padded input", [1, 6, 6],
     [{"type": "relu"}, conv(2, 3, dilation=3)], None, 1, "window 7 is larger"),
    ("output shrinks to zero", [1, 8, 8],
     [{"type": "maxpool2d", "kernel_size": 2}, {"type": "maxpool2d", "kernel_size": 2},
      {"type": "maxpool2d", "kernel_size": 2}, {"type": "maxpool2d", "kernel_size": 2}],
     None, 3, "shrink"),
    ("linear before flatten", [1, 8, 8],
     [conv(4), {"type": "linear", "out_features": 10}], None, 1, "needs a flat input"),
    ("conv after flatten", [1, 8, 8],
     [{"type": "flatten"}, conv(4)], None, 1, "needs a [C, H, W] input"),
    ("pool padding over half the kernel", [1, 8, 8],
     [{"type": "maxpool2d", "kernel_size": 2, "padding": 2}], None, 0,
     "padding 2 must be at most half the kernel size 2"),
    ("avgpool padding over half the kernel", [1, 8, 8],
     [conv(2), {"type": "avgpool2d", "kernel_size": 3, "padding": 2}], None, 1,
     "padding 2 must be at most half"),
    ("groups that do not divide in_channels", [3, 8, 8],
     [conv(4, 3, groups=2)], None, 0, "groups 2 must divide in_channels 3"),
    ("groups that do not divide out_channels", [4, 8, 8],
     [conv(3, 3, groups=2)], None, 0, "groups 2 must divide"),
    ("num_classes mismatch", [1, 8, 8],
     [{"type": "flatten"}, {"type": "linear", "out_features": 5}], 10, 1,
     "outputs [5] but num_classes is 10"),
    ("num_classes on a spatial output", [1, 8, 8],
     [conv(10)], 10, 0, "outputs [10, 6, 6] but num_classes is 10"),
]


@pytest.mark.parametrize(("input_shape", "layers", "num_classes", "index", "reason"),
                         [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_spec_names_layer_index_and_reason(input_shape, layers, num_classes, index,
                                                   reason):
    model = spec(input_shape, *layers, num_classes=num_classes)
    with pytest.raises(SpecError) as info:
        infer(model)
    assert info.value.index == index
    assert str(info.value).startswith(f"layer {index} ({layers[index]['type']}): ")
    assert reason in str(info.value)


SCHEMA_INVALID = [
    ("negative size", [conv(4, -3)], ("layers", 1, "conv2d", "kernel_size")),
    ("negative padding", [conv(4, 3, padding=-1)], ("layers", 1, "conv2d", "padding")),
    ("zero out_channels", [conv(0)], ("layers", 1, "conv2d", "out_channels")),
    ("unknown type", [{"type": "conv3d", "out_channels": 4}], ("layers", 1)),
    ("missing type", [{"out_channels": 4}], ("layers", 1)),
    ("unknown field", [conv(4, 3, padding_mode="reflect")],
     ("layers", 1, "conv2d", "padding_mode")),
    ("dropout p of 1", [{"type": "dropout", "p": 1.0}], ("layers", 1, "dropout", "p")),
]


@pytest.mark.parametrize(("layers", "loc"), [c[1:] for c in SCHEMA_INVALID],
                         ids=[c[0] for c in SCHEMA_INVALID])
def test_schema_errors_name_the_layer_index(layers, loc):
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate({"input_shape": [1, 8, 8],
                                  "layers": [{"type": "relu"}, *layers]})
    errors = info.value.errors()
    assert any(tuple(e["loc"][:len(loc)]) == loc for e in errors), errors


@pytest.mark.parametrize("shape", [[1, 8], [0, 8, 8], [1, -8, 8], [1, 8, 8, 8]])
def test_bad_input_shape_is_refused(shape):
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate({"input_shape": shape, "layers": [{"type": "relu"}]})
    assert info.value.errors()[0]["loc"][0] == "input_shape"


def test_empty_layer_list_is_refused():
    with pytest.raises(ValidationError) as info:
        ModelSpec.model_validate({"input_shape": [1, 8, 8], "layers": []})
    assert info.value.errors()[0]["loc"] == ("layers",)
