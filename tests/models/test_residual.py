"""Residual blocks: inference against the recurrence and torch, layer names inside blocks,
the checkpoint tensor names, and capture of inner layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from api.feature_maps import expected_tensors
from convoy.featuremaps import layer_names, resolve_layers
from models.build import build_model
from models.capture import capture
from models.spec import ModelSpec, SpecError, infer, layer_count, named_rows


def conv(out: int, k: int = 3, stride: int = 1, pad: int = 1, bias: bool = True
         ) -> dict[str, Any]:
    return {"type": "conv2d", "out_channels": out, "kernel_size": k, "stride": stride,
            "padding": pad, "bias": bias}


def stride2_block(bn: bool = True) -> dict[str, Any]:
    inner = [conv(8, stride=2, bias=not bn), *([{"type": "batchnorm2d"}] if bn else []),
             {"type": "relu"}, conv(8, bias=not bn), *([{"type": "batchnorm2d"}] if bn else [])]
    return {"type": "residual", "shortcut": "projection", "layers": inner}


def test_resnet_small_parameters_equal_torch():
    spec = ModelSpec.model_validate({"preset": "resnet-small"})
    summary = infer(spec)
    model = build_model(spec)
    assert summary["total_params"] == sum(p.numel() for p in model.parameters()) == 175_258
    # 3 stages of 2 blocks, the first block of stages 2 and 3 with a projection
    blocks = [row for row in summary["layers"] if row["type"] == "residual"]
    assert [b["shortcut"]["type"] for b in blocks] == [
        "identity", "identity", "projection", "identity", "projection", "identity"]
    assert [b["output_shape"] for b in blocks][::2] == [[16, 32, 32], [32, 16, 16], [64, 8, 8]]
    assert layer_count(spec) == len(spec.layers) + sum(len(b["layers"]) for b in blocks)


def test_projection_block_with_stride_2_has_the_recurrence_receptive_field():
    """Stem 3x3 (rf 3, jump 1); in the block a 3x3 stride 2 (rf 3 + 2*1 = 5, jump 2) and a
    3x3 (rf 5 + 2*2 = 9, jump 2); the 1x1 projection adds nothing: the block's field is 9."""
    spec = ModelSpec.model_validate({"input_shape": [1, 32, 32],
                                     "layers": [conv(4), stride2_block()]})
    block = infer(spec)["layers"][1]
    assert [r["receptive_field"] for r in block["layers"]] == [[5, 5]] * 3 + [[9, 9]] * 2
    assert block["receptive_field"] == [9, 9] and block["jump"] == [2, 2]
    assert block["shortcut"] == {"type": "projection", "stride": [2, 2], "batchnorm": True,
                                 "params": 4 * 8 + 2 * 8}
    assert block["output_shape"] == [8, 16, 16]


def test_block_receptive_field_equals_the_input_gradient_support():
    """Without batch norm and ReLU, all-ones weights: one output unit's input gradient is
    nonzero exactly on what it sees, through both paths of the block."""
    spec = ModelSpec.model_validate({"input_shape": [1, 32, 32],
                                     "layers": [conv(1, bias=False), {
                                         "type": "residual", "shortcut": "projection",
                                         "layers": [conv(1, stride=2, bias=False),
                                                    conv(1, bias=False)]}]})
    rf = infer(spec)["layers"][-1]["receptive_field"]
    model = build_model(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
    x = torch.ones(1, 1, 32, 32, requires_grad=True)
    model(x)[0, 0, 8, 8].backward()
    assert x.grad is not None
    hit = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    assert int(hit[-1] - hit[0]) + 1 == rf[0] == 9


def test_identity_shortcut_must_keep_the_shape_and_errors_name_the_inner_layer():
    spec = ModelSpec.model_validate({"input_shape": [3, 8, 8], "layers": [
        {"type": "residual", "layers": [conv(4)]}]})
    with pytest.raises(SpecError, match=r"layer 0 \(residual\): an identity shortcut"):
        infer(spec)
    spec = ModelSpec.model_validate({"input_shape": [3, 8, 8], "layers": [
        conv(3), {"type": "residual", "layers": [conv(3), conv(3, k=20, pad=0)]}]})
    with pytest.raises(SpecError) as info:
        infer(spec)
    assert (info.value.index, info.value.inner) == (1, 1)
    assert str(info.value).startswith("layer 1 (residual) layer 1 (conv2d): window 20")
    # a projection whose stride cannot reproduce the block's output size
    spec = ModelSpec.model_validate({"input_shape": [3, 9, 9], "layers": [
        {"type": "residual", "shortcut": "projection", "layers": [conv(4, k=3, pad=0)]}]})
    with pytest.raises(SpecError, match="projection shortcut"):
        infer(spec)
    for bad in ({"type": "flatten"}, {"type": "linear", "out_features": 3},
                {"type": "residual", "layers": [conv(3)]}):
        with pytest.raises(ValueError):
            ModelSpec.model_validate({"input_shape": [3, 8, 8], "layers": [
                {"type": "residual", "layers": [bad]}]})


def test_inner_layers_are_named_and_captured_in_forward_order():
    spec = ModelSpec.model_validate({"input_shape": [1, 16, 16], "num_classes": 3, "layers": [
        conv(4), stride2_block(), {"type": "relu"}, {"type": "flatten"},
        {"type": "linear", "out_features": 3}]})
    summary = infer(spec)
    names = layer_names(summary)
    assert names == ["0-conv2d", "1-residual/0-conv2d", "1-residual/1-batchnorm2d",
                     "1-residual/2-relu", "1-residual/3-conv2d", "1-residual/4-batchnorm2d",
                     "1-residual", "2-relu", "3-flatten", "4-linear"]
    assert [n for n, _ in named_rows(summary)] == names
    # a bare index is the top-level layer; a path is the inner one
    assert resolve_layers(summary, ["1", "1-residual/3-conv2d", "2"]) == [4, 6, 7]
    model = build_model(spec).eval()
    x = torch.randn(3, 1, 16, 16)
    got = capture(model, x, list(range(len(names))))
    with torch.no_grad():
        stem = model.layers[0](x)
        block = model.layers[1]
        first = block.layers[0](stem)
        assert torch.equal(got[1].maps, first)
        assert torch.allclose(got[6].maps, block(stem))
        assert torch.allclose(got[9].maps, model(x))
    for i, row in enumerate(named_rows(summary)):
        assert list(got[i].maps.shape[1:]) == row[1]["output_shape"], names[i]


def test_checkpoint_tensor_names_and_shapes_are_the_modules():
    spec = ModelSpec.model_validate({"preset": "resnet-small"})
    expected = expected_tensors(spec, infer(spec))
    actual = {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}
    assert expected == actual
    assert "layers.7.shortcut.1.running_mean" in expected  # the stage 2 projection's norm


def test_invariance_of_a_model_with_blocks_measures_its_own_output():
    """models.invariance numbers layers as capture() does: a block's inner layers, then the
    block; the flatten after the relu is that relu's measure, and the output is the linear."""
    from models.invariance import measure

    spec = ModelSpec.model_validate({"input_shape": [1, 16, 16], "num_classes": 3, "layers": [
        conv(4), stride2_block(), {"type": "relu"}, {"type": "flatten"},
        {"type": "linear", "out_features": 3}]})
    names = layer_names(infer(spec))
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(5, 1, 16, 16).numpy()
    wanted = list(range(len(names)))[:2] + [7, 8]
    got = measure(model, x, None, wanted, {"translate": [1]}, classes=3,
                  device=torch.device("cpu"))
    assert sorted(got.layers) == wanted
    assert got.layers[8] == got.layers[7]  # flatten: the relu's values
    assert got.output is not None
    # the output's agreement is the model's own (its last layer), computed here by hand
    t = torch.from_numpy(x)
    moved = []
    for dim, step in ((3, 1), (3, -1), (2, 1), (2, -1)):
        y = torch.roll(t, step, dims=dim)
        edge = [slice(None)] * 4
        edge[dim] = 0 if step == 1 else -1
        y[tuple(edge)] = 0
        moved.append(y)
    with torch.no_grad():
        base = model(t).argmax(1)
        agree = torch.stack([model(m).argmax(1) == base for m in moved]).float().mean()
    assert got.output[("translate", 1.0)][0] == pytest.approx(float(agree))
    for i in wanted:
        cos, dist = got.layers[i][("translate", 1.0)]
        assert -1 <= cos <= 1 and dist is not None and dist >= 0, names[i]
