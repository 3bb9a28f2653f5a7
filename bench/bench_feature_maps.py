"""Feature-map extraction: (1) the extraction step's throughput (images/s of models.capture
with argmax and extra pooling, and of worker.feature_maps.extract, which also brings the maps
to host numpy) over a bare PyTorch forward pass with a forward hook on every layer, same
model, inputs and threads, interleaved ABAB, medians; (2) end-to-end feature-map jobs
through the real service (API, Redis, Celery worker, PostgreSQL), their time split into
forward, encoding (npy, PNG) and storage, and the stored bytes pooled vs unpooled.

    python -m bench.bench_feature_maps [--device auto|cpu|cuda] [--rounds 15] [--smoke]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from bench.common import median, model_bench_args
from convoy import datasets
from models.build import build_model
from models.capture import capture, channels_last
from models.presets import digits_cnn
from models.spec import ModelSpec
from worker.feature_maps import extract

DIGITS_CNN = digits_cnn()
VGG_SMALL = {"preset": "vgg-small", "num_classes": 4}
CASES = [("digits-cnn", DIGITS_CNN, 256), ("vgg-small", VGG_SMALL, 64)]
POOL = {"type": "max", "kernel_size": 2, "global": False}


def inputs_for(spec: dict[str, Any], n: int) -> np.ndarray:
    if spec is DIGITS_CNN:
        return datasets.load_digits().all_x[:n]
    split = datasets.load_synthetic(datasets.SyntheticRef(name="synthetic", samples=max(n, 80)))
    return split.all_x[:n]


def hooked(model: torch.nn.Module) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """The baseline: a forward pass with a hook on every layer keeping its output."""
    holder: list[list[torch.Tensor]] = [[]]
    for m in model.layers:  # type: ignore[union-attr]
        m.register_forward_hook(lambda _m, _i, out: holder[0].append(out))

    def run(x: torch.Tensor) -> list[torch.Tensor]:
        # a fresh list per call, dropped by the caller: every variant starts with the
        # previous batch's maps freed, as capture's are
        holder[0] = outputs = []
        model(x)
        holder[0] = []
        return outputs

    return run


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time on CUDA; on CPU this process's CPU time, so that other processes on a
    shared machine (a loaded CI box, other test runs) do not add their time slices."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return clock() - t


def repeat(fn: Callable[[], Any], times: int) -> None:
    for _ in range(times):
        fn()  # the result is dropped at once, as the worker drops each batch's tensors


def abab(variants: dict[str, Callable[[], Any]], device: torch.device, rounds: int,
         reps: int = 1) -> dict[str, float]:
    """Median seconds of `reps` calls of each variant, the variants taking turns in each of
    `rounds` rounds (ABAB), after one warm-up call each; under inference mode."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up (cudnn autotune, allocator)
            fn()
        for _ in range(rounds):
            for key, fn in variants.items():
                times[key].append(timed(lambda f=fn: repeat(f, reps), device))
    return {k: median(v) for k, v in times.items()}


def measure(name: str, raw: dict[str, Any], n: int, device: torch.device, rounds: int,
            reps: int) -> dict[str, float]:
    """Images/s of each variant on one model and batch."""
    spec = ModelSpec.model_validate(raw)
    torch.manual_seed(0)
    plain = build_model(spec).eval().to(device)
    twins = [build_model(spec).eval().to(device) for _ in range(3)]
    for twin in twins:  # same weights; hooks on two twins, capture on the third
        twin.load_state_dict(plain.state_dict())
    base, base_cl = hooked(twins[0]), hooked(channels_last(twins[1]))
    model = channels_last(twins[2])  # as the worker loads it
    x_np = inputs_for(raw, n)
    x = torch.from_numpy(x_np).to(device)
    x_cl = channels_last(model, x)
    layers = list(range(len(spec.layers)))
    variants: dict[str, Callable[[], Any]] = {
        "hooks": lambda: base(x),
        "hooks_cl": lambda: base_cl(x_cl),
        "capture": lambda: capture(model, x_cl, layers),
        "pool": lambda: capture(model, x_cl, layers, POOL),
        # what the worker runs: capture, pooling, and the maps in host numpy arrays
        "extract": lambda: extract(model, x_np, layers, pool=POOL, dtype="float32",
                                   device=device, batch=n),
    }
    return {k: n * reps / t for k, t in abab(variants, device, rounds, reps).items()}


def throughput(device: torch.device, rounds: int, reps: int) -> None:
    clock = "wall time" if device.type == "cuda" else "process CPU time"
    print(f"\n## extraction step, images/s by {clock} (median of {rounds} ABAB rounds x "
          f"{reps} batches)")
    print("hooks: bare forward, a hook keeping every layer's output (NCHW, as users write it);"
          " hooks_cl: the same in channels-last;\ncapture: models.capture (argmax of max "
          "pooling); +pool: with extra 2x2 max pooling of every map; extract: the worker's "
          "step,\n+pool and maps copied to host numpy. ratio = variant / hooks "
          "(/ hooks_cl in brackets)")
    print(f"{'model':<11} {'batch':>5} {'hooks':>8} {'hooks_cl':>8} {'capture':>8} "
          f"{'ratio':>12} {'+pool':>8} {'ratio':>12} {'extract':>8} {'ratio':>12}")
    for name, raw, n in CASES:
        rate = measure(name, raw, n, device, rounds, reps)

        def cell(key: str, r: dict[str, float] = rate) -> str:
            return (f"{r[key]:>8.0f} {r[key] / r['hooks']:>5.2f} "
                    f"({r[key] / r['hooks_cl']:.2f})")

        print(f"{name:<11} {n:>5} {rate['hooks']:>8.0f} {rate['hooks_cl']:>8.0f} "
              f"{cell('capture')} {cell('pool')} {cell('extract')}")


def run_job(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    from tests.services import wait_job

    t0 = time.perf_counter()
    r = client.post("/v1/jobs", json=body)
    r.raise_for_status()
    job = wait_job(client, r.json()["id"], timeout=600)
    wall = time.perf_counter() - t0
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['state']}: {job['error']}")
    job["wall_s"] = wall
    return job


def end_to_end(device: str, smoke: bool) -> None:
    from bench.stacks import service

    print("\n## end-to-end feature-map jobs (PostgreSQL + Redis + 1 Celery worker), seconds")
    print(f"{'job':<34} {'wall':>6} {'load':>6} {'forward':>7} {'npy':>6} {'png':>6} "
          f"{'store':>6} {'files':>6} {'stored MB':>9} {'unpooled MB':>11}")
    with service("pg") as stack, stack.client() as client:
        for name, raw, n in CASES:
            n = 16 if smoke else n
            inputs = {"dataset": "digits" if raw is DIGITS_CNN else
                      {"name": "synthetic", "samples": 80}, "indices": list(range(n)),
                      "split": "all"}
            for label, extra in (("png", {}), ("no png", {"png": False}),
                                 ("max pool 2, no png", {"png": False, "pool": POOL}),
                                 ("global avg, no png", {"png": False,
                                                         "pool": {"type": "avg",
                                                                  "global": True}})):
                body = {"kind": "feature_maps", "device": device, "inputs": inputs,
                        "source": {"model": raw, "seed": 0}, **extra}
                job = run_job(client, body)
                res, t = job["result"], job["result"]["timings"]
                print(f"{f'{name} x{n}, {label}':<34} {job['wall_s']:>6.2f} {t['load_s']:>6.2f} "
                      f"{t['forward_s']:>7.3f} {t['encode_npy_s']:>6.3f} "
                      f"{t['encode_png_s']:>6.2f} {t['storage_s']:>6.2f} {res['artifacts']:>6} "
                      f"{res['bytes_stored'] / 1e6:>9.3f} {res['bytes_unpooled'] / 1e6:>11.3f}")


def main() -> None:
    args = model_bench_args(__doc__, rounds=15, smoke="a few rounds, 16-image jobs", extra=[
        ("--reps", {"type": int, "default": 5, "help": "batches per timed window"})])
    device = args.device
    throughput(device, 3 if args.smoke else args.rounds, 1 if args.smoke else args.reps)
    if not args.no_e2e:
        end_to_end(device.type, args.smoke)


if __name__ == "__main__":
    main()
