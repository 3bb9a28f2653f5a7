"""A model summary's cost is O(layers). Adaptive pooling's windows were listed one by one
(O(output size) per layer, seconds of CPU for 512 layers of 4096); their closed forms must
equal that listing exactly."""

from __future__ import annotations

import time

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


def test_512_adaptive_pool_layers_cost_milliseconds() -> None:
    spec = ModelSpec.model_validate({
        "input_shape": [1, 4096, 4096],
        "layers": [{"type": "adaptive_avgpool2d", "output_size": [4096, 4095 + i % 2]}
                   for i in range(512)]})
    t = time.process_time()
    summary = infer(spec)
    assert time.process_time() - t < 0.2  # the listing took seconds
    assert summary["output_shape"] == [1, 4096, 4096]
