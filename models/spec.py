"""The model spec schema and plain-Python inference of every layer's output shape,
parameters, receptive field and FLOPs. No torch here: the API validates specs with it.

Shapes follow torch's own formulas exactly (tests/models/test_spec_matches_torch.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

Side = Annotated[int, Field(ge=1, le=4096)]
Pad = Annotated[int, Field(ge=0, le=1024)]
Size = Side | Annotated[list[Side], Field(min_length=2, max_length=2)]
PadSize = Pad | Annotated[list[Pad], Field(min_length=2, max_length=2)]
Shape = tuple[int, ...]


def pair(value: int | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Conv2d(_Layer):
    type: Literal["conv2d"]
    out_channels: Annotated[int, Field(ge=1, le=65536)]
    kernel_size: Size
    stride: Size = 1
    padding: PadSize = 0
    dilation: Size = 1
    groups: Annotated[int, Field(ge=1, le=65536)] = 1
    bias: bool = True


class MaxPool2d(_Layer):
    type: Literal["maxpool2d"]
    kernel_size: Size
    stride: Size | None = None
    padding: PadSize = 0
    dilation: Size = 1
    ceil_mode: bool = False


class AvgPool2d(_Layer):
    type: Literal["avgpool2d"]
    kernel_size: Size
    stride: Size | None = None
    padding: PadSize = 0
    ceil_mode: bool = False
    count_include_pad: bool = True


class AdaptiveAvgPool2d(_Layer):
    type: Literal["adaptive_avgpool2d"]
    output_size: Size = 1


class ReLU(_Layer):
    type: Literal["relu"]


class LeakyReLU(_Layer):
    type: Literal["leaky_relu"]
    negative_slope: Annotated[float, Field(ge=0, le=1)] = 0.01


class GELU(_Layer):
    type: Literal["gelu"]


class Tanh(_Layer):
    type: Literal["tanh"]


class Sigmoid(_Layer):
    type: Literal["sigmoid"]


class BatchNorm2d(_Layer):
    type: Literal["batchnorm2d"]
    eps: Annotated[float, Field(gt=0, le=1)] = 1e-5
    momentum: Annotated[float, Field(ge=0, le=1)] = 0.1


class Dropout(_Layer):
    type: Literal["dropout"]
    p: Annotated[float, Field(ge=0, lt=1)] = 0.5


class Flatten(_Layer):
    type: Literal["flatten"]


class Linear(_Layer):
    type: Literal["linear"]
    out_features: Annotated[int, Field(ge=1, le=1_000_000)]
    bias: bool = True


# What a residual block may hold: layers that keep a [C, H, W] map (no flatten or linear,
# and no block inside a block).
BlockLayer = Annotated[
    Conv2d | MaxPool2d | AvgPool2d | AdaptiveAvgPool2d | ReLU | LeakyReLU | GELU | Tanh
    | Sigmoid | BatchNorm2d | Dropout,
    Field(discriminator="type"),
]


class Residual(_Layer):
    """y = layers(x) + shortcut(x). `identity` adds x itself (the block must keep its shape);
    `projection` adds a 1x1 convolution of x with the block's stride (the product of its
    layers' strides) to the block's output channels, followed by batch norm when the block
    has a batchnorm2d layer (and then the 1x1 convolution has no bias). Put the activation
    that follows the sum (ResNet's ReLU) after the block."""

    type: Literal["residual"]
    layers: Annotated[list[BlockLayer], Field(min_length=1, max_length=64)]
    shortcut: Literal["identity", "projection"] = "identity"

    @property
    def projection_bn(self) -> bool:
        return any(inner.type == "batchnorm2d" for inner in self.layers)


Layer = Annotated[
    Conv2d | MaxPool2d | AvgPool2d | AdaptiveAvgPool2d | ReLU | LeakyReLU | GELU | Tanh
    | Sigmoid | BatchNorm2d | Dropout | Flatten | Linear | Residual,
    Field(discriminator="type"),
]
LAYER_TYPES = (
    "conv2d", "maxpool2d", "avgpool2d", "adaptive_avgpool2d", "relu", "leaky_relu", "gelu",
    "tanh", "sigmoid", "batchnorm2d", "dropout", "flatten", "linear", "residual",
)
ACTIVATIONS = ("relu", "leaky_relu", "gelu", "tanh", "sigmoid")
POOLS = ("maxpool2d", "avgpool2d", "adaptive_avgpool2d")


class ModelSpec(BaseModel):
    """A CNN: input [C, H, W], a list of layers, and optionally the number of classes
    that the last layer must output. `{"preset": "lenet5"}` expands to a full spec."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = None
    input_shape: Annotated[list[Side], Field(min_length=3, max_length=3)]
    num_classes: Annotated[int, Field(ge=1, le=100_000)] | None = None
    layers: Annotated[list[Layer], Field(min_length=1, max_length=512)]

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        # a preset that is not a string is left to the field's own type error
        if isinstance(data, dict) and isinstance(data.get("preset"), str) \
                and "layers" not in data:
            from models.presets import expand_preset

            return expand_preset(data)
        return data

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """Two shapes in the schema, as validation takes them: a preset by name (an enum of
        the presets; input_shape and num_classes optional) or a full spec with its layers."""
        from models.presets import PRESETS

        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        full = {**target, "title": "FullSpec"}
        props = full.get("properties", {})
        by_name = {
            "type": "object", "title": "PresetSpec", "additionalProperties": False,
            "required": ["preset"],
            "properties": {"preset": {"type": "string", "enum": sorted(PRESETS),
                                      "title": "Preset"},
                           **{k: props[k] for k in ("input_shape", "num_classes") if k in props}},
        }
        description = target.get("description")
        target.clear()
        target.update({"title": "ModelSpec", "anyOf": [by_name, full]})
        if description:
            target["description"] = description
        return schema


class SpecError(ValueError):
    """An invalid spec, naming the layer index and the reason. A layer inside a residual
    block has `inner` set to its index in the block (`index` is the block's)."""

    def __init__(self, index: int | None, layer_type: str | None, reason: str,
                 inner: tuple[int, str] | None = None) -> None:
        where = f"layer {index} ({layer_type})" if index is not None else "model"
        if inner is not None:
            where += f" layer {inner[0]} ({inner[1]})"
        super().__init__(f"{where}: {reason}")
        self.index = index
        self.inner = inner[0] if inner is not None else None
        self.reason = reason


def layer_count(spec: ModelSpec) -> int:
    """Every layer of the spec, those inside residual blocks included."""
    return sum(1 + (len(layer.layers) if isinstance(layer, Residual) else 0)
               for layer in spec.layers)


def layer_path(index: int, layer_type: str, parent: str | None = None) -> str:
    """A layer's name: `{index}-{type}`, and `{block}/{index}-{type}` inside a residual
    block (`3-residual/1-conv2d`). Feature-map and invariance jobs name layers by it."""
    name = f"{index}-{layer_type}"
    return f"{parent}/{name}" if parent else name


def named_rows(summary: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every layer's (name, summary row) in the order the forward pass computes them: a
    block's inner layers, then the block itself (its output is the sum)."""
    out: list[tuple[str, dict[str, Any]]] = []
    for row in summary["layers"]:
        name = layer_path(row["index"], row["type"])
        for inner in row.get("layers") or ():
            out.append((layer_path(inner["index"], inner["type"], name), inner))
        out.append((name, row))
    return out


def _window_out(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil: bool) -> int:
    """torch's pooling_output_shape (and the conv formula when ceil is False)."""
    span = dilation * (kernel - 1) + 1
    out = (size + 2 * pad - span + ((stride - 1) if ceil else 0)) // stride + 1
    if ceil and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _adaptive_windows(size: int, out: int) -> tuple[int, int]:
    """Largest window and smallest start-to-start step of adaptive pooling over one axis.

    Closed forms of torch's windows [floor(i*size/out), ceil((i+1)*size/out)) for i < out:
    window i is ceil(f_i + size/out) with f_i = (i*size mod out)/out, whose largest value is
    (out - gcd(size, out))/out; the step from i to i+1 is floor(f_i + size/out), smallest at
    i = 0. O(1), where listing every window cost O(out) per layer (512 layers of out=4096
    took 2 s of CPU; tests/models/test_spec_cost.py checks the forms against the listing)."""
    g = math.gcd(size, out)
    window = -(-(out - g + size) // out)
    step = (size // out if out > 1 else size) or 1
    return window, step


def _mix_all(rf: tuple[int, int], before: tuple[int, int], after: tuple[int, int],
             input_shape: list[int]) -> tuple[int, int]:
    """The receptive field of a unit that mixes every position of a map of `before` [H, W]
    positions into `after`: on an axis reduced from several positions to one, the whole input
    (the conventional answer; the window formula would give more than the image); elsewhere
    `rf` unchanged. One position mixes nothing: its unit sees what that position saw."""
    return (input_shape[1] if before[0] > 1 and after[0] == 1 else rf[0],
            input_shape[2] if before[1] > 1 and after[1] == 1 else rf[1])


@dataclass
class _State:
    """What inference carries from one layer to the next."""
    shape: Shape
    rf: tuple[int, int]
    jump: tuple[int, int]
    # the [H, W] positions a flat vector's features came from (1, 1 once a linear mixed them)
    positions: tuple[int, int]


def _row(index: int, layer: Any, before: _State, after: _State, params: int,
         flops: int) -> dict[str, Any]:
    out_numel = math.prod(after.shape)
    fc_equivalent = math.prod(before.shape) * out_numel + out_numel
    return {
        "index": index,
        "type": layer.type,
        "input_shape": list(before.shape),
        "output_shape": list(after.shape),
        "params": params,
        "receptive_field": list(after.rf),
        "jump": list(after.jump),
        "flops": flops,
        "fc_equivalent_params": fc_equivalent if layer.type in ("conv2d", "linear") else None,
    }


def _plain(layer: Any, st: _State, input_shape: list[int],
           fail: Callable[[str], SpecError]) -> tuple[_State, int, int]:
    """One layer that is not a block: the state after it, its parameters and FLOPs."""
    shape, rf, jump, positions = st.shape, st.rf, st.jump, st.positions
    params = flops = 0
    spatial = len(shape) == 3
    needs_map = layer.type in (*POOLS, "conv2d", "batchnorm2d")
    if needs_map and not spatial:
        raise fail(f"needs a [C, H, W] input but gets the flat vector {list(shape)}; "
                   "put it before flatten")
    if layer.type in ("conv2d", "maxpool2d", "avgpool2d"):
        c, h, w = shape
        k = pair(layer.kernel_size)
        stride_raw = layer.stride if layer.stride is not None else layer.kernel_size
        s = pair(stride_raw)
        p = pair(layer.padding)
        d = pair(getattr(layer, "dilation", 1))
        ceil = bool(getattr(layer, "ceil_mode", False))
        for axis, size in enumerate((h, w)):
            if layer.type != "conv2d" and p[axis] > k[axis] // 2:
                raise fail(f"padding {p[axis]} must be at most half the kernel size {k[axis]}")
            window = d[axis] * (k[axis] - 1) + 1
            # with ceil_mode a pooling window may overhang the padded input (torch allows it
            # as long as one window starts inside), so the output size is the test
            if _window_out(size, k[axis], s[axis], p[axis], d[axis], ceil) < 1:
                raise fail(f"window {window} is larger than its padded input "
                           f"{size + 2 * p[axis]} (input {h}x{w}, padding {p[axis]}), so "
                           "its output would shrink to zero")
        oh = _window_out(h, k[0], s[0], p[0], d[0], ceil)
        ow = _window_out(w, k[1], s[1], p[1], d[1], ceil)
        if layer.type == "conv2d":
            if c % layer.groups or layer.out_channels % layer.groups:
                raise fail(f"groups {layer.groups} must divide in_channels {c} and "
                           f"out_channels {layer.out_channels}")
            per_out = (c // layer.groups) * k[0] * k[1]
            params = layer.out_channels * per_out + (layer.out_channels if layer.bias else 0)
            out: Shape = (layer.out_channels, oh, ow)
            flops = 2 * per_out * math.prod(out)
        else:
            out = (c, oh, ow)
            flops = k[0] * k[1] * math.prod(out)
        span = (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1)
        rf = (rf[0] + (span[0] - 1) * jump[0], rf[1] + (span[1] - 1) * jump[1])
        jump = (jump[0] * s[0], jump[1] * s[1])
    elif layer.type == "adaptive_avgpool2d":
        c, h, w = shape
        oh, ow = pair(layer.output_size)
        (kh, sh), (kw, sw) = _adaptive_windows(h, oh), _adaptive_windows(w, ow)
        out = (c, oh, ow)
        flops = h * w * c
        rf = (rf[0] + (kh - 1) * jump[0], rf[1] + (kw - 1) * jump[1])
        jump = (jump[0] * sh, jump[1] * sw)
        # pooling an axis to 1 mixes all its positions: the unit sees the whole input there
        rf = _mix_all(rf, (h, w), (oh, ow), input_shape)
    elif layer.type == "batchnorm2d":
        out = shape
        params = 2 * shape[0]
        flops = 2 * math.prod(shape)
    elif layer.type == "flatten":
        # a flattened feature is still one unit of the map before it: same field
        out = (math.prod(shape),)
        if spatial:
            positions = (shape[1], shape[2])
    elif layer.type == "linear":
        if spatial:
            raise fail(f"needs a flat input but gets {list(shape)}; put a flatten (or an "
                       "adaptive_avgpool2d and a flatten) before it")
        # the first linear layer after flatten mixes every position of the flattened map
        rf = _mix_all(rf, positions, (1, 1), input_shape)
        positions = (1, 1)
        (features,) = shape
        params = features * layer.out_features + (layer.out_features if layer.bias else 0)
        out = (layer.out_features,)
        flops = 2 * features * layer.out_features
    else:  # activations and dropout keep the shape
        out = shape
        flops = math.prod(shape) if layer.type in ACTIVATIONS else 0
    return _State(out, rf, jump, positions), params, flops


def _residual(index: int, block: Residual, st: _State, input_shape: list[int],
              max_side: int | None
              ) -> tuple[_State, int, int, list[dict[str, Any]], dict[str, Any]]:
    """A residual block: the state after the sum, parameters, FLOPs, its inner rows and its
    shortcut (`{"type", "stride", "batchnorm", "params"}`)."""
    if len(st.shape) != 3:
        raise SpecError(index, "residual", f"needs a [C, H, W] input but gets the flat "
                                           f"vector {list(st.shape)}; put it before flatten")
    inner_rows: list[dict[str, Any]] = []
    cur, params, flops = st, 0, 0
    for j, layer in enumerate(block.layers):
        def fail(reason: str, _j: int = j, _t: str = layer.type) -> SpecError:
            return SpecError(index, "residual", reason, inner=(_j, _t))

        nxt, p, f = _plain(layer, cur, input_shape, fail)
        _check_side(nxt.shape, max_side, fail)
        inner_rows.append(_row(j, layer, cur, nxt, p, f))
        params, flops, cur = params + p, flops + f, nxt
    c_in, h, w = st.shape
    c_out, oh, ow = cur.shape
    rf = cur.rf
    shortcut: dict[str, Any] = {"type": block.shortcut}
    if block.shortcut == "identity":
        if cur.shape != st.shape:
            raise SpecError(index, "residual", f"an identity shortcut needs the block to keep "
                                               f"its shape {list(st.shape)}, but its layers "
                                               f"output {list(cur.shape)}; use \"shortcut\": "
                                               "\"projection\"")
    else:
        # the block's stride: how far apart its output units are in its input
        sh, sw = cur.jump[0] // st.jump[0], cur.jump[1] // st.jump[1]
        if sh < 1 or sw < 1 or ((h - 1) // sh + 1, (w - 1) // sw + 1) != (oh, ow):
            raise SpecError(index, "residual", f"the projection shortcut (a 1x1 convolution "
                                               f"with the block's stride {[sh, sw]}) maps "
                                               f"{h}x{w} to {(h - 1) // max(sh, 1) + 1}x"
                                               f"{(w - 1) // max(sw, 1) + 1}, but the block's "
                                               f"layers output {oh}x{ow}")
        bn = block.projection_bn
        own = c_in * c_out + (2 * c_out if bn else c_out)
        shortcut.update(stride=[sh, sw], batchnorm=bn, params=own)
        params += own
        flops += 2 * c_in * c_out * oh * ow + (2 * c_out * oh * ow if bn else 0)
        # a 1x1 window adds nothing to the field: the sum sees what the main path saw
    flops += c_out * oh * ow  # the sum
    return (_State(cur.shape, rf, cur.jump, st.positions), params, flops, inner_rows,
            shortcut)


def _check_side(shape: Shape, max_side: int | None, fail: Callable[[str], SpecError]) -> None:
    if max_side is not None and len(shape) == 3 and max(shape[1], shape[2]) > max_side:
        raise fail(f"output {shape[1]}x{shape[2]} exceeds the limit max_feature_side="
                   f"{max_side}")


def infer(spec: ModelSpec, *, max_side: int | None = None) -> dict[str, Any]:
    """Each layer's output shape, parameters, receptive field, jump and FLOPs, and totals.
    A residual block's row holds its inner layers' rows under `layers` and counts their
    parameters and FLOPs (plus its projection's and the sum's). Raises SpecError for a
    layer that cannot take its input, or (with `max_side`) whose output map is larger than
    max_side on a side. Costs O(layers)."""
    state = _State(tuple(spec.input_shape), (1, 1), (1, 1), (1, 1))
    in_numel = math.prod(state.shape)
    rows: list[dict[str, Any]] = []
    total_params = total_flops = act_numel = 0
    for index, layer in enumerate(spec.layers):

        def fail(reason: str, _i: int = index, _t: str = layer.type) -> SpecError:
            return SpecError(_i, _t, reason)

        if isinstance(layer, Residual):
            after, params, flops, inner, shortcut = _residual(
                index, layer, state, spec.input_shape, max_side)
            act_numel += sum(math.prod(r["output_shape"]) for r in inner)
        else:
            after, params, flops = _plain(layer, state, spec.input_shape, fail)
            inner = []
        _check_side(after.shape, max_side, fail)
        row = _row(index, layer, state, after, params, flops)
        if isinstance(layer, Residual):
            row["layers"] = inner
            row["shortcut"] = shortcut
        rows.append(row)
        total_params += params
        total_flops += flops
        act_numel += math.prod(after.shape)
        state = after
    shape = state.shape
    if spec.num_classes is not None and shape != (spec.num_classes,):
        raise SpecError(len(spec.layers) - 1, spec.layers[-1].type,
                        f"the model outputs {list(shape)} but num_classes is {spec.num_classes}; "
                        f"end with flatten and a linear layer of {spec.num_classes} outputs")
    first = next((r for r in rows if r["type"] in ("conv2d", "linear")), None)
    units = math.prod(first["output_shape"]) if first else 0
    return {
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "layers": rows,
        "output_shape": list(shape),
        "total_params": total_params,
        "total_flops": total_flops,
        # the classic comparison: one fully connected layer as wide as the first layer
        "fully_connected_equivalent": {
            "input_features": in_numel,
            "units": units,
            "params": in_numel * units + units,
        },
        "activation_bytes_per_sample": 4 * (act_numel + in_numel),
    }


def summarize(raw: dict[str, Any]) -> tuple[ModelSpec, dict[str, Any]]:
    spec = ModelSpec.model_validate(raw)
    return spec, infer(spec)
