"""A model summary's cost is O(layers). Adaptive pooling's windows were listed one by one
(O(output size) per layer, seconds of CPU for 512 layers of 4096); their closed forms must
equal that listing exactly."""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from models.spec import ModelSpec, _adaptive_windows, infer


def listed_windows(size: int, out: int) -> tuple[int, int]:
    """The former implementation: every window of torch's adaptive pooling, listed."""
    starts = [(i * size) // out for i in range(out)]
    ends = [-((-(i + 1) * size) // out) for i in range(out)]
    window = max(e - s for s, e in zip(starts, ends, strict=True))
    step = min((b - a for a, b in zip(starts, starts[1:], strict=False)), default=size) or 1
    return window, step


def test_adaptive_windows_closed_form_equals_the_listing() -> None:
    sizes = [*range(1, 130), 255, 256, 257, 1000, 4095, 4096]
    for size in sizes:
        for out in [*range(1, 130), 255, 256, 257, 1000, 4095, 4096]:
            assert _adaptive_windows(size, out) == listed_windows(size, out), (size, out)


def lines_run(call: Callable[[], Any]) -> tuple[int, Any]:
    """How many Python lines `call` runs (every frame, comprehensions included): a count of
    work that does not depend on how busy the machine is."""
    count = 0

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        if event == "line":
            count += 1
        return tracer

    sys.settrace(tracer)
    try:
        result = call()
    finally:
        sys.settrace(None)
    return count, result


def adaptive_tower(layers: int, out: int) -> ModelSpec:
    return ModelSpec.model_validate({
        "input_shape": [1, 4096, 4096],
        "layers": [{"type": "adaptive_avgpool2d", "output_size": [out, out - 1 + i % 2]}
                   for i in range(layers)]})


def test_512_adaptive_pool_layers_cost_does_not_grow_with_output_size() -> None:
    """The listing ran O(output size) lines per layer: millions for 512 layers of 4096.
    The closed form runs the same lines for an output of 4096 as for one of 8."""
    small, _ = lines_run(lambda: infer(adaptive_tower(512, 8)))
    large, summary = lines_run(lambda: infer(adaptive_tower(512, 4096)))
    assert summary["output_shape"] == [1, 4096, 4096]
    assert large <= small * 1.05, (small, large)
    assert large < 512 * 400, large  # O(layers): a few hundred lines per layer at most
