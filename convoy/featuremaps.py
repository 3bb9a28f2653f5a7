"""Plain-Python rules shared by the API (checks at submission) and the worker (extraction):
how layers are named and which ones a request captures (the shape of a pooled map is
models/pooling.py's).

A layer is named `{index}-{type}` after its place in the spec, e.g. `0-conv2d`, `2-maxpool2d`;
a request may list layers by that name or by the bare index (`"2"`).
"""

from __future__ import annotations

from typing import Any

from convoy.artifacts import job_key


class UnknownLayer(ValueError):
    def __init__(self, position: int, wanted: str, names: list[str]) -> None:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        super().__init__(f"unknown layer {wanted[:64]!r}; this model's layers are: {shown}")
        self.position = position


def is_index(text: str, max_digits: int = 6) -> bool:
    """A plain decimal index written in ASCII digits (0-9), at most `max_digits` long."""
    return 0 < len(text) <= max_digits and text.isascii() and text.isdigit()


def layer_name(index: int, layer_type: str) -> str:
    return f"{index}-{layer_type}"


def layer_names(summary: dict[str, Any]) -> list[str]:
    return [layer_name(row["index"], row["type"]) for row in summary["layers"]]


def resolve_layers(summary: dict[str, Any], wanted: list[str] | None) -> list[int]:
    """Indices of the layers to capture, in model order; every layer when `wanted` is None."""
    names = layer_names(summary)
    if wanted is None:
        return list(range(len(names)))
    by_name = {name: i for i, name in enumerate(names)}
    picked: set[int] = set()
    for position, item in enumerate(wanted):
        key = item.strip()
        # ASCII digits only: str.isdigit() is true for "¹" (int() refuses it) and "٣" (which
        # int() reads as 3); neither names a layer
        if is_index(key) and int(key) < len(names):
            picked.add(int(key))
        elif key in by_name:
            picked.add(by_name[key])
        else:
            raise UnknownLayer(position, item, names)
    return sorted(picked)


def png_key(job_id: str, layer: str, image: int) -> str:
    """Where image k's PNG grid of a layer is stored: by the job (png: eager), or by the API
    when it is first asked for (png: lazy, the default)."""
    return job_key(job_id, "feature-maps", "png", layer, f"{image:05d}.png")
