"""Invariance jobs: (1) the measuring step's throughput (images/s through the model, originals
and transformed copies, of models.invariance.measure: transforms, capture, cosines, distances,
output agreement) beside a bare PyTorch forward pass with a hook on every layer over the same
transformed batches made beforehand, same model and threads, interleaved ABAB, medians;
(2) invariance jobs through the real service (API, Redis, Celery worker, PostgreSQL): the
images/s each job reports beside the bare forward over its batches.

    python -m bench.bench_invariance [--device auto|cpu|cuda] [--rounds 9] [--smoke]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.bench_feature_maps import DIGITS_CNN, abab, clock_name, hooked, inputs_for
from bench.common import model_bench_args
from models.build import build_model
from models.capture import channels_last
from models.invariance import chunks, measure, transform_list
from models.spec import ModelSpec, infer

LENET5 = {"preset": "lenet5-padded", "input_shape": [1, 8, 8], "num_classes": 10}
VGG_SMALL = {"preset": "vgg-small", "num_classes": 4}
TRANSFORMS = {"translate": [1, 2], "rotate": [15, 30], "scale": [0.8, 1.25]}


def cases(smoke: bool) -> list[tuple[str, dict[str, Any], int]]:
    n = 32 if smoke else 256
    return [("digits-cnn", DIGITS_CNN, n), ("lenet5", LENET5, n),
            ("vgg-small", VGG_SMALL, 16 if smoke else 64)]


def batches(x: np.ndarray, transforms: dict[str, list[float]], device: torch.device
            ) -> list[torch.Tensor]:
    """The batches the job sends through the model, made beforehand: the originals, then
    each chunk of transformed copies."""
    xb = torch.from_numpy(x).to(device)
    copies = transform_list(transforms)
    return [xb, *(torch.cat([copies[j].apply(xb) for j in group])
                  for group in chunks(len(copies), len(x)))]


def rates(raw: dict[str, Any], n: int, device: torch.device, rounds: int
          ) -> tuple[dict[str, float], int]:
    """Images/s of the job's measuring step and of the bare hooked forward (NCHW as users
    write it, and channels-last as the worker runs it), and the images one pass sends
    through the model."""
    spec = ModelSpec.model_validate(raw)
    summary = infer(spec)
    torch.manual_seed(0)
    model = build_model(spec).eval().to(device)
    bare = hooked(build_model(spec).eval().to(device))
    bare_cl = hooked(channels_last(build_model(spec).eval().to(device)))
    x = inputs_for(raw if raw is VGG_SMALL else DIGITS_CNN, n)
    out = summary["output_shape"]
    layers = list(range(len(spec.layers)))
    prepared = batches(x, TRANSFORMS, device)
    images = sum(len(b) for b in prepared)
    prepared_cl = [channels_last(model, b) for b in prepared]
    variants: dict[str, Callable[[], Any]] = {
        "job": lambda: measure(model, x, None, layers, TRANSFORMS, device=device,
                               classes=out[0] if len(out) == 1 else None),
        "bare": lambda: [bare(b) for b in prepared],
        "bare_cl": lambda: [bare_cl(b) for b in prepared_cl],
    }
    return {k: images / t for k, t in abab(variants, device, rounds).items()}, images


def throughput(device: torch.device, rounds: int, smoke: bool) -> None:
    clock = clock_name(device)
    print(f"\n## measuring step, images/s through the model by {clock} (median of {rounds} "
          f"ABAB rounds); transforms {TRANSFORMS}")
    print("job: models.invariance.measure (the job's loop); bare: a forward pass with a hook on "
          "every layer over the same batches, transformed beforehand (NCHW);\nbare_cl: the same "
          "in channels-last, as the worker runs the model. ratio = job / bare (/ bare_cl)")
    print(f"{'model':<11} {'inputs':>6} {'images':>7} {'job':>9} {'bare':>9} {'bare_cl':>9} "
          f"{'ratio':>12}")
    for name, raw, n in cases(smoke):
        r, images = rates(raw, n, device, rounds)
        print(f"{name:<11} {n:>6} {images:>7} {r['job']:>9.0f} {r['bare']:>9.0f} "
              f"{r['bare_cl']:>9.0f} {r['job'] / r['bare']:>5.2f} ({r['job'] / r['bare_cl']:.2f})")


def end_to_end(device: torch.device, smoke: bool) -> None:
    from bench.bench_feature_maps import run_job
    from bench.stacks import service

    clock = clock_name(device)
    print("\n## invariance jobs through the service (PostgreSQL + Redis + 1 Celery worker): "
          f"images/s of each job's one measuring pass\nin the worker by {clock} (timings."
          f"{'measure_s' if device.type == 'cuda' else 'measure_cpu_s'}; first call included), "
          "beside the bare hooked forward (NCHW, this process, same batches);\n'reported' is "
          "the job's own images_per_second (wall time: on a shared machine, other processes' "
          "turns count). ratio = job / bare")
    print(f"{'model':<11} {'inputs':>6} {'wall s':>7} {'reported':>9} {'job':>9} {'bare':>9} "
          f"{'ratio':>6}")
    with service("pg") as stack, stack.client() as client:
        for name, raw, n in cases(smoke):
            dataset = {"name": "synthetic", "samples": 80} if raw is VGG_SMALL else "digits"
            job = run_job(client, {
                "kind": "invariance", "device": device.type, "source": {"model": raw, "seed": 0},
                "inputs": {"dataset": dataset, "split": "all", "indices": list(range(n))},
                "transforms": TRANSFORMS})
            bare = rates(raw, n, device, 3)[0]["bare"]
            res = job["result"]
            seconds = res["timings"]["measure_s" if device.type == "cuda" else "measure_cpu_s"]
            rate = res["images_through_model"] / max(seconds, 1e-9)
            print(f"{name:<11} {n:>6} {job['wall_s']:>7.2f} {res['images_per_second']:>9.0f} "
                  f"{rate:>9.0f} {bare:>9.0f} {rate / bare:>6.2f}")


def main() -> None:
    args = model_bench_args(__doc__, rounds=9, smoke="a few rounds, small batches")
    throughput(args.device, 2 if args.smoke else args.rounds, args.smoke)
    if not args.no_e2e:
        end_to_end(args.device, args.smoke)


if __name__ == "__main__":
    main()
