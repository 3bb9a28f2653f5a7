"""models.spec (plain Python) against torch itself, on random specs drawn by hypothesis:
every layer's output shape, parameter count and conv/linear FLOPs must equal torch's, and a
layer that spec.infer refuses must also be one that torch cannot run."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from models.build import ResidualBlock, build_layer, build_model
from models.spec import ModelSpec, SpecError, infer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# what torch raises for a layer it cannot run (IndexError: a 2-D input to a 2-D pooling)
TORCH_ERRORS = (RuntimeError, ValueError, IndexError)
ACTIVATIONS = ["relu", "leaky_relu", "gelu", "tanh", "sigmoid"]


def maybe_pair(draw: st.DrawFn, a: int, b: int) -> int | list[int]:
    """Half the time an int, half the time the [h, w] form (equal or not)."""
    return a if a == b and draw(st.booleans()) else [a, b]


# --- valid specs, built layer by layer from the current shape --------------------------------

@st.composite
def window_params(draw: st.DrawFn, size: tuple[int, int], *, pool: bool, dilation: bool
                  ) -> dict[str, Any]:
    """Kernel, stride, padding (and dilation) per axis such that the window fits its padded
    input; pooling padding stays at most half the kernel, as torch requires."""
    k, s, p, d = [], [], [], []
    for n in size:
        dd = draw(st.integers(1, 3)) if dilation else 1
        if pool:
            kk = draw(st.integers(1, 4))
            pp = draw(st.integers(0, kk // 2))
            if dd * (kk - 1) + 1 > n + 2 * pp:
                dd = 1
                kk = min(kk, n + 2 * pp)
                pp = min(pp, kk // 2)
        else:
            pp = draw(st.integers(0, 2))
            kk = draw(st.integers(1, min(5, (n + 2 * pp - 1) // dd + 1)))
        k.append(kk), s.append(draw(st.integers(1, 3))), p.append(pp), d.append(dd)
    out: dict[str, Any] = {"kernel_size": maybe_pair(draw, *k), "padding": maybe_pair(draw, *p)}
    if not pool or draw(st.booleans()):
        out["stride"] = maybe_pair(draw, *s)
    if dilation:
        out["dilation"] = maybe_pair(draw, *d)
    return out


@st.composite
def spatial_layer(draw: st.DrawFn, shape: tuple[int, int, int]) -> dict[str, Any]:
    c, h, w = shape
    kind = draw(st.sampled_from(["conv2d", "conv2d", "maxpool2d", "avgpool2d",
                                 "adaptive_avgpool2d", "activation", "batchnorm2d", "dropout"]))
    if kind == "conv2d":
        groups = draw(st.sampled_from([g for g in (1, 2, 3, 4) if c % g == 0]))
        return {"type": "conv2d", "out_channels": groups * draw(st.integers(1, 3)),
                "groups": groups, "bias": draw(st.booleans()),
                **draw(window_params((h, w), pool=False, dilation=True))}
    if kind == "maxpool2d":
        return {"type": "maxpool2d", "ceil_mode": draw(st.booleans()),
                **draw(window_params((h, w), pool=True, dilation=True))}
    if kind == "avgpool2d":
        return {"type": "avgpool2d", "ceil_mode": draw(st.booleans()),
                "count_include_pad": draw(st.booleans()),
                **draw(window_params((h, w), pool=True, dilation=False))}
    if kind == "adaptive_avgpool2d":
        return {"type": "adaptive_avgpool2d",
                "output_size": maybe_pair(draw, draw(st.integers(1, 5)), draw(st.integers(1, 5)))}
    if kind == "activation":
        return {"type": draw(st.sampled_from(ACTIVATIONS))}
    if kind == "dropout":
        return {"type": "dropout", "p": draw(st.sampled_from([0.0, 0.25, 0.5]))}
    return {"type": "batchnorm2d"}


def shape_after(input_shape: list[int], layers: list[dict[str, Any]]) -> tuple[int, ...]:
    if not layers:
        return tuple(input_shape)
    s = infer(ModelSpec.model_validate({"input_shape": input_shape, "layers": layers}))
    return tuple(s["output_shape"])


@st.composite
def residual_block(draw: st.DrawFn, input_shape: list[int], before: list[dict[str, Any]]
                   ) -> dict[str, Any] | None:
    """A residual block of 1-3 spatial layers on the current shape, with an identity shortcut
    when they keep the shape (or a projection, drawn), a projection otherwise; None when no
    1x1 projection with the block's stride fits (the spec is then refused, tested apart)."""
    shape = shape_after(input_shape, before)
    inner: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 3))):
        inner.append(draw(spatial_layer(shape_after(list(shape), inner))))
    block = {"type": "residual", "layers": inner,
             "shortcut": "projection" if shape_after(list(shape), inner) != shape
             or draw(st.booleans()) else "identity"}
    try:
        infer(ModelSpec.model_validate({"input_shape": input_shape, "layers": [*before, block]}))
    except SpecError:
        return None
    return block


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    input_shape = [draw(st.integers(1, 4)), draw(st.integers(1, 14)), draw(st.integers(1, 14))]
    layers: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 3)) == 0:
            block = draw(residual_block(input_shape, layers))
            if block is not None:
                layers.append(block)
                continue
        layers.append(draw(spatial_layer(shape_after(input_shape, layers))))
    if draw(st.booleans()):
        layers.append({"type": "flatten"})
        for _ in range(draw(st.integers(0, 3))):
            layers.append(draw(st.sampled_from([
                {"type": "linear", "out_features": draw(st.integers(1, 12)),
                 "bias": draw(st.booleans())},
                {"type": draw(st.sampled_from(ACTIVATIONS))},
                {"type": "dropout"},
            ])))
        layers.append({"type": "linear", "out_features": draw(st.integers(1, 10))})
    return {"input_shape": input_shape, "layers": layers}


def torch_rows(model: torch.nn.Module, input_shape: list[int]) -> list[dict[str, Any]]:
    """Each layer's output shape (per sample), parameter count and counted FLOPs; a residual
    block's also its inner layers' rows under "layers"."""
    shapes: dict[torch.nn.Module, list[int]] = {}

    def hook(module: torch.nn.Module, _i: Any, out: torch.Tensor) -> None:
        shapes[module] = list(out.shape[1:])

    hooks = [m.register_forward_hook(hook) for m in model.layers.modules()]
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(2, *input_shape))
    for h in hooks:
        h.remove()
    counts = counter.get_flop_counts()

    def row(name: str, layer: torch.nn.Module) -> dict[str, Any]:
        out: dict[str, Any] = {"output_shape": shapes[layer],
                               "params": sum(p.numel() for p in layer.parameters()),
                               "flops": sum(counts.get(name, {}).values()) // 2}
        if isinstance(layer, ResidualBlock):
            out["layers"] = [row(f"{name}.layers.{j}", inner)
                             for j, inner in enumerate(layer.layers)]
        return out

    return [row(f"ConvNet.layers.{i}", layer) for i, layer in enumerate(model.layers)]


def projection_flops(row: dict[str, Any]) -> int:
    """The multiply-adds of a block's 1x1 projection, as torch counts them (no batch norm)."""
    if row["shortcut"]["type"] != "projection":
        return 0
    c_out, oh, ow = row["output_shape"]
    return 2 * row["input_shape"][0] * c_out * oh * ow


@FAST
@given(valid_specs())
def test_every_layer_shape_params_and_flops_equal_torch(raw):
    spec = ModelSpec.model_validate(raw)
    summary = infer(spec)
    rows = torch_rows(build_model(spec), raw["input_shape"])
    assert len(rows) == len(summary["layers"])
    for ours, theirs in zip(summary["layers"], rows, strict=True):
        where = f"layer {ours['index']} {spec.layers[ours['index']]}"
        assert ours["output_shape"] == theirs["output_shape"], where
        assert ours["params"] == theirs["params"], where
        # torch counts the multiply-adds of convolutions and matrix products only
        if ours["type"] in ("conv2d", "linear"):
            assert ours["flops"] == theirs["flops"], where
        if ours["type"] == "residual":
            counted = 0
            for inner, inner_torch in zip(ours["layers"], theirs["layers"], strict=True):
                assert inner["output_shape"] == inner_torch["output_shape"], where
                assert inner["params"] == inner_torch["params"], where
                if inner["type"] == "conv2d":
                    assert inner["flops"] == inner_torch["flops"], where
                    counted += inner["flops"]
            assert counted + projection_flops(ours) == theirs["flops"], where
    assert summary["total_params"] == sum(p.numel() for p in build_model(spec).parameters())


@pytest.mark.parametrize(("preset", "input_shape"), [
    ("lenet5", None), ("lenet5", [3, 32, 32]), ("lenet5-padded", None),
    ("lenet5-padded", [1, 8, 8]), ("vgg-small", None), ("vgg-small", [1, 8, 8]),
    ("resnet-small", None), ("resnet-small", [1, 8, 8]),
])
def test_presets_match_torch(preset, input_shape):
    raw: dict[str, Any] = {"preset": preset}
    if input_shape:
        raw["input_shape"] = input_shape
    spec = ModelSpec.model_validate(raw)
    summary = infer(spec)
    rows = torch_rows(build_model(spec), list(spec.input_shape))
    assert [r["output_shape"] for r in summary["layers"]] == [r["output_shape"] for r in rows]
    assert [r["params"] for r in summary["layers"]] == [r["params"] for r in rows]


# --- the boundary: one layer on one input, drawn from a box that holds both sides ------------

@st.composite
def one_layer(draw: st.DrawFn) -> tuple[list[int], dict[str, Any]]:
    c = draw(st.integers(1, 6))
    input_shape = [c, draw(st.integers(1, 7)), draw(st.integers(1, 7))]
    kind = draw(st.sampled_from(["conv2d", "maxpool2d", "avgpool2d"]))
    k = maybe_pair(draw, draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    layer: dict[str, Any] = {
        "type": kind, "kernel_size": k,
        "stride": maybe_pair(draw, draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        "padding": maybe_pair(draw, draw(st.integers(0, 2)), draw(st.integers(0, 2))),
    }
    if kind != "avgpool2d":
        layer["dilation"] = maybe_pair(draw, draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if kind == "conv2d":
        layer["groups"] = draw(st.sampled_from([1, 1, 2, 3]))
        layer["out_channels"] = draw(st.integers(1, 8))
    else:
        layer["ceil_mode"] = draw(st.booleans())
    return input_shape, layer


def run_torch(layer_raw: dict[str, Any], in_shape: tuple[int, ...]) -> list[int]:
    """Build the layer as Convoy does and run it on a batch of 2; torch's output shape."""
    spec = ModelSpec.model_validate({"input_shape": [1, 1, 1], "layers": [layer_raw]})
    module = build_layer(spec.layers[0], in_shape).eval()
    with torch.no_grad():
        return list(module(torch.randn(2, *in_shape)).shape[1:])


@FAST
@given(one_layer())
def test_infer_accepts_exactly_what_torch_accepts(case):
    input_shape, layer = case
    spec = ModelSpec.model_validate({"input_shape": input_shape, "layers": [layer]})
    try:
        ours = infer(spec)["layers"][0]["output_shape"]
    except SpecError as exc:
        assert exc.index == 0
        with pytest.raises(TORCH_ERRORS):
            run_torch(layer, tuple(input_shape))
    else:
        assert run_torch(layer, tuple(input_shape)) == ours


# --- refused specs: a valid prefix, then one bad layer ----------------------------------------

@st.composite
def refused_specs(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A valid prefix and one layer that cannot take its input. (A num_classes mismatch is
    Convoy's own contract, not torch's, so it is tested in test_spec.py only.)"""
    raw = draw(valid_specs())
    layers = raw["layers"]
    flat_at = next((i for i, la in enumerate(layers) if la["type"] == "flatten"), None)
    prefix = layers[:flat_at] if flat_at is not None else layers
    c, h, w = shape_after(raw["input_shape"], prefix)
    reasons = ["too_wide", "pool_padding", "after_flatten", "linear_on_map"]
    if c > 1:
        reasons.append("groups")
    reason = draw(st.sampled_from(reasons))
    kind = draw(st.sampled_from(["conv2d", "maxpool2d"]))
    bad: dict[str, Any]
    if reason == "too_wide":
        pad = draw(st.integers(0, 1))
        axis_k = [min(h, w) + 2 * pad + draw(st.integers(1, 3))] * 2
        bad = {"type": kind, "kernel_size": axis_k, "padding": pad}
        if kind == "maxpool2d":
            bad["padding"] = 0
    elif reason == "pool_padding":
        k = draw(st.integers(1, 4))
        bad = {"type": draw(st.sampled_from(["maxpool2d", "avgpool2d"])), "kernel_size": k,
               "padding": k // 2 + draw(st.integers(1, 2))}
    elif reason == "groups":
        g = draw(st.sampled_from([g for g in range(2, c + 2) if c % g]))
        bad = {"type": "conv2d", "out_channels": g, "kernel_size": 1, "groups": g}
    elif reason == "after_flatten":
        prefix = [*prefix, {"type": "flatten"}]
        bad = draw(st.sampled_from([
            {"type": "conv2d", "out_channels": 2, "kernel_size": 1},
            {"type": "maxpool2d", "kernel_size": 1},
            {"type": "avgpool2d", "kernel_size": 1},
            {"type": "adaptive_avgpool2d"},
            {"type": "batchnorm2d"},
        ]))
    else:
        bad = {"type": "linear", "out_features": draw(st.integers(1, 10))}
    if kind == "conv2d" and bad["type"] == "conv2d" and "out_channels" not in bad:
        bad["out_channels"] = 2
    return {"input_shape": raw["input_shape"], "layers": [*prefix, bad]}, reason


@FAST
@given(refused_specs())
def test_refused_layers_also_fail_in_torch(case):
    raw, reason = case
    spec = ModelSpec.model_validate(raw)
    index = len(raw["layers"]) - 1
    with pytest.raises(SpecError) as info:
        infer(spec)
    assert info.value.index == index, (reason, str(info.value))
    assert str(info.value).startswith(f"layer {index} ({raw['layers'][index]['type']}): ")
    in_shape = shape_after(raw["input_shape"], raw["layers"][:-1])
    if reason == "linear_on_map":
        # torch's Linear acts on the last axis of any tensor, so it runs whenever W equals the
        # in_features it was built with; it never yields the flat [out_features] a classifier
        # needs. Convoy refuses it on purpose and asks for a flatten first.
        try:
            out = run_torch(raw["layers"][-1], in_shape)
        except RuntimeError:
            return
        assert len(out) == 3
        return
    with pytest.raises(TORCH_ERRORS):
        run_torch(raw["layers"][-1], in_shape)


# --- receptive field and jump: the bounding box of one output unit's input gradient ----------

@st.composite
def window_chains(draw: st.DrawFn) -> list[dict[str, Any]]:
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv2d", "maxpool2d", "avgpool2d"]))
        k = draw(st.integers(1, 4))
        layer: dict[str, Any] = {"type": kind, "kernel_size": k, "stride": draw(st.integers(1, 2)),
                                 "padding": draw(st.integers(0, k // 2))}
        if kind != "avgpool2d":
            layer["dilation"] = draw(st.integers(1, 2))
        if kind == "conv2d":
            layer["out_channels"] = 1
        layers.append(layer)
    return layers


@FAST
@given(window_chains())
def test_receptive_field_and_jump_equal_the_input_gradient_support(layers):
    """Every windowed layer is run as an all-ones depthwise convolution with the same kernel,
    stride, padding and dilation, so one output unit's gradient is nonzero exactly on the input
    pixels it depends on: their bounding box must be the receptive field."""
    probe = ModelSpec.model_validate({"input_shape": [1, 64, 64], "layers": layers})
    rows = infer(probe)["layers"]
    rf, jump = rows[-1]["receptive_field"][0], rows[-1]["jump"][0]
    # where output unit 0 starts, in input pixels: the padding of each layer, scaled
    offset, j = 0, 1
    for layer in probe.layers:
        offset += layer.padding * j
        j *= layer.stride
    unit = -(-offset // jump)  # the first unit whose window lies inside the image
    size = unit * jump - offset + rf + 2
    spec = ModelSpec.model_validate({"input_shape": [1, size, size], "layers": layers})
    net = torch.nn.Sequential(*(
        torch.nn.Conv2d(1, 1, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                        dilation=getattr(layer, "dilation", 1), bias=False)
        for layer in spec.layers))
    for conv in net:
        torch.nn.init.ones_(conv.weight)
    x = torch.ones(1, 1, size, size, requires_grad=True)
    net(x)[0, 0, unit, unit].backward()
    rows_hit = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    assert int(rows_hit[0]) == unit * jump - offset
    assert int(rows_hit[-1] - rows_hit[0]) + 1 == rf
    assert infer(spec)["layers"][-1]["receptive_field"] == [rf, rf]
