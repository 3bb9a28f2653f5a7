"""Plain-Python rules shared by the API (checks at submission) and the worker (extraction):
how layers are named and which ones a request captures (the shape of a pooled map is
models/pooling.py's).

A layer is named `{index}-{type}` after its place in the spec, e.g. `0-conv2d`, `2-maxpool2d`,
and a layer inside a residual block `{block}/{index}-{type}`, e.g. `3-residual/1-conv2d`
(models.spec.named_rows); a request may list layers by that name or by the bare index of a
top-level layer (`"2"`). Layers are numbered by their position in forward order.
"""

from __future__ import annotations

from typing import Any

from convoy.artifacts import job_key
from models.spec import layer_path, named_rows


class UnknownLayer(ValueError):
    def __init__(self, position: int, wanted: str, names: list[str]) -> None:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        super().__init__(f"unknown layer {wanted[:64]!r}; this model's layers are: {shown}")
        self.position = position


def is_index(text: str, max_digits: int = 6) -> bool:
    """A plain decimal index written in ASCII digits (0-9), at most `max_digits` long."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def layer_name(index: int, layer_type: str) -> str:
    return layer_path(index, layer_type)


def layer_names(summary: dict[str, Any]) -> list[str]:
    """Every layer's name, in forward order (inner layers of a block before the block)."""
    return [name for name, _ in named_rows(summary)]


def layer_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Every layer's summary row, in the order of layer_names."""
    return [row for _, row in named_rows(summary)]


def resolve_layers(summary: dict[str, Any], wanted: list[str] | None) -> list[int]:
    """Indices of the layers to capture, in model order; every layer when `wanted` is None."""
    names = layer_names(summary)
    if wanted is None:
        return list(range(len(names)))
    by_name = {name: i for i, name in enumerate(names)}
    top = {int(name.split("-", 1)[0]): i for i, name in enumerate(names) if "/" not in name}
    picked: set[int] = set()
    for position, item in enumerate(wanted):
        key = item.strip()
        # ASCII digits only: str.isdigit() is true for "¹" (int() refuses it) and "٣" (which
        # int() reads as 3); neither names a layer
        if is_index(key) and int(key) in top:
            picked.add(top[int(key)])
        elif key in by_name:
            picked.add(by_name[key])
        else:
            raise UnknownLayer(position, item, names)
    return sorted(picked)


def png_key(job_id: str, layer: str, image: int) -> str:
    """Where image k's PNG grid of a layer is stored: by the job (png: eager), or by the API
    when it is first asked for (png: lazy, the default)."""
    return job_key(job_id, "feature-maps", "png", layer, f"{image:05d}.png")
