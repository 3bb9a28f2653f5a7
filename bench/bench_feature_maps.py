"""Feature-map extraction: (1) the extraction step's throughput (images/s of models.capture
with argmax and extra pooling, and of worker.feature_maps.extract, which also brings the maps
to host numpy) over a bare PyTorch forward pass with a forward hook on every layer, same
model, inputs and threads, interleaved ABAB, medians; (2) end-to-end feature-map jobs
through the real service (API, Redis, Celery worker, PostgreSQL), their time split into
forward, encoding (npy, PNG) and storage, and the stored bytes pooled vs unpooled, and the
first (rendering) and cached request of a lazy PNG; (3) dataset scale: 500 and 20,000-image
jobs over every layer of vgg-small beside a bare hooked forward that writes the same .npy
files, the lazy-PNG default beside no PNGs, and images/s by size.

    python -m bench.bench_feature_maps [--device auto|cpu|cuda] [--rounds 15] [--smoke]
                                       [--scale-only]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
    for m in model.layers:
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


def clock_name(device: torch.device) -> str:
    """What `timed` measures on `device`, for the tables' headings."""
    return "wall time" if device.type == "cuda" else "process CPU time"


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
    clock = clock_name(device)
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_job(client: Any, body: dict[str, Any], worker_pid: int | None = None) -> dict[str, Any]:
    """The finished job, with `wall_s`: from just before the POST to the job's finished_at
    (the API runs on this machine, same clock), so the 0.2 s between two polls of the job
    is not counted as the job's time; `post_s`: to created_at (the API checking the
    request), `queued_s`: created_at to started_at (the broker and the worker picking the
    job up), `run_s`: started_at to finished_at; `cpu_s`: the CPU seconds the worker process
    `worker_pid` (a solo pool: the job runs in it) spent meanwhile, when given."""
    from tests.services import wait_job

    cpu = cpu_seconds(worker_pid) if worker_pid else 0.0
    t0 = time.time()
    r = client.post("/v1/jobs", json=body)
    r.raise_for_status()
    job = wait_job(client, r.json()["id"], timeout=600)
    if job["state"] != "succeeded":
        raise RuntimeError(f"job {job['id']} {job['state']}: {job['error']}")
    created, started, finished = (datetime.fromisoformat(job[k]).timestamp()
                                  for k in ("created_at", "started_at", "finished_at"))
    job["wall_s"] = finished - t0
    job["post_s"], job["queued_s"] = created - t0, started - created
    job["run_s"] = finished - started
    if worker_pid:
        job["cpu_s"] = cpu_seconds(worker_pid) - cpu
    return job


def end_to_end(device: str, smoke: bool) -> None:
    from bench.stacks import service

    print("\n## end-to-end feature-map jobs (PostgreSQL + Redis + 1 Celery worker), seconds")
    print(f"{'job':<34} {'wall':>6} {'load':>6} {'forward':>7} {'npy':>6} {'png':>6} "
          f"{'store':>6} {'files':>6} {'stored MB':>9} {'unpooled MB':>11}")
    lazy_pngs: list[tuple[str, str]] = []
    with service("pg") as stack, stack.client() as client:
        for name, raw, n in CASES:
            n = 16 if smoke else n
            inputs = {"dataset": "digits" if raw is DIGITS_CNN else
                      {"name": "synthetic", "samples": 80}, "indices": list(range(n)),
                      "split": "all"}
            for label, extra in (("eager png", {"png": "eager"}), ("lazy png", {}),
                                 ("no png", {"png": "off"}),
                                 ("max pool 2, no png", {"png": "off", "pool": POOL}),
                                 ("global avg, no png", {"png": "off",
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
                if label == "lazy png":
                    lazy_pngs.append((name, job["id"]))
        for name, job_id in lazy_pngs:  # the first request renders and caches; then cached
            url = f"/v1/jobs/{job_id}/feature-maps/0"
            times = []
            for _ in range(2):
                t = time.perf_counter()
                r = client.get(url, params={"format": "png", "image": 5 % n})
                r.raise_for_status()
                times.append(time.perf_counter() - t)
            print(f"{name} lazy png of layer 0: first request {times[0] * 1e3:.1f} ms, "
                  f"cached {times[1] * 1e3:.1f} ms")


SCALE_MODEL = {"preset": "vgg-small", "input_shape": [3, 8, 8], "num_classes": 4}


def scale_dataset(n: int) -> dict[str, Any]:
    return {"name": "synthetic", "samples": max(n, 80), "size": 8, "channels": 3,
            "num_classes": 4}


def bare_job(n: int, out: Path, batch: int = 256) -> tuple[float, float, int]:
    """The baseline of a job: the same dataset generated, the same model built, a plain
    forward pass with a hook on every layer, each layer's outputs appended batch by batch to
    its own .npy (header first), and, as a job stores them, each max-pooling layer's argmax
    (int32, from a second pooling of its input with return_indices, in channels-last as the
    job pools: NCHW pooling costs the bare loop 2x more) to its own .npy; seconds of wall
    time, seconds of this process's CPU time, and the bytes written: the same files as a
    job's, minus the job's sha256s and statistics."""
    from worker.npystream import npy_header

    t, cpu = time.perf_counter(), time.process_time()
    x = datasets.load_synthetic(datasets.SyntheticRef(**scale_dataset(n))).all_x[:n]
    spec = ModelSpec.model_validate(SCALE_MODEL)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    files: list[Any] = []
    outputs: list[torch.Tensor] = []
    names: list[str] = []

    def argmax(m: torch.nn.MaxPool2d, i: tuple[torch.Tensor, ...], _o: torch.Tensor) -> None:
        where = F.max_pool2d(i[0].contiguous(memory_format=torch.channels_last), m.kernel_size,
                             m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode,
                             return_indices=True)[1]
        outputs.append(where.int())

    for k, m in enumerate(model.layers):
        m.register_forward_hook(lambda _m, _i, o: outputs.append(o))
        names.append(f"{k}.npy")
        if isinstance(m, torch.nn.MaxPool2d):
            m.register_forward_hook(argmax)
            names.append(f"{k}.argmax.npy")
    try:
        with torch.inference_mode():
            for start in range(0, n, batch):
                outputs.clear()
                model(torch.from_numpy(np.ascontiguousarray(x[start:start + batch])))
                if not files:
                    for name, o in zip(names, outputs, strict=True):
                        f = open(out / name, "wb")  # noqa: SIM115 - closed below
                        f.write(npy_header((n, *o.shape[1:]),
                                           np.dtype(str(o.dtype).removeprefix("torch."))))
                        files.append(f)
                for f, o in zip(files, outputs, strict=True):
                    f.write(o.contiguous().numpy().data)
    finally:
        for f in files:
            f.close()
    return (time.perf_counter() - t, time.process_time() - cpu,
            sum(p.stat().st_size for p in out.iterdir()))


def scale(device: str, smoke: bool, rounds: int = 2) -> None:
    """Jobs over every layer of vgg-small (3x8x8, no pooling) for a small and a large number
    of inputs: the no-PNG job beside the bare hooked forward writing the same .npy files, the
    default (lazy PNG) job beside the no-PNG job, and images/s for both sizes. Each size runs
    `rounds` rounds of bare, no-PNG, lazy in turn (the fastest of each counts); a job's files
    are removed after it, so the disk does not fill up between rounds."""
    from bench.stacks import service

    sizes = (64, 512) if smoke else (500, 20_000)
    print(f"\n## dataset scale: vgg-small 3x8x8, every layer, no pooling, wall seconds, best of "
          f"{rounds} (bare: hooked forward + the same .npy files, argmax included, written in "
          "this process; jobs: POST -> finished_at, split into post (-> created_at), queued "
          "(-> started_at) and run (-> finished_at), run by the no-PNG job's result.timings; "
          "stats: CPU seconds of the writer threads, beside the forward)")
    rates = {}
    # no dataset kept between jobs (CONVOY_DATASET_CACHE_BYTES): each job generates its
    # inputs, as each bare run does
    with service("pg", CONVOY_DATASET_CACHE_BYTES="0") as stack, stack.client() as client:
        for n in sizes:
            inputs = {"dataset": scale_dataset(n), "indices": {"start": 0, "stop": n}}
            times: dict[str, list[float]] = {"bare": [], "off": [], "lazy": []}
            cpus: dict[str, list[float]] = {"bare": [], "off": []}
            off_job: dict[str, Any] = {}
            for _ in range(rounds):
                with tempfile.TemporaryDirectory(prefix="convoy-bare-") as tmp:
                    seconds, bare_cpu, bare_bytes = bare_job(n, Path(tmp))
                    times["bare"].append(seconds)
                    cpus["bare"].append(bare_cpu)
                for png in ("off", "lazy"):
                    job = run_job(client, {"kind": "feature_maps", "device": device,
                                           "inputs": inputs, "png": png,
                                           "source": {"model": SCALE_MODEL, "seed": 0}},
                                  worker_pid=stack.workers[0].pid)
                    times[png].append(job["wall_s"])
                    if png == "off":
                        cpus["off"].append(job["cpu_s"])
                    if png == "off" and job["wall_s"] == min(times["off"]):
                        off_job = job
                    shutil.rmtree(stack.home / "artifacts" / "jobs" / job["id"],
                                  ignore_errors=True)
            bare, off, lazy = (min(times[k]) for k in ("bare", "off", "lazy"))
            rates[n] = n / off
            res, t = off_job["result"], off_job["result"]["timings"]
            print(f"x{n:<6} bare {bare:6.2f}  no-png job {off:6.2f}  ratio bare/job = "
                  f"{bare / off:.2f}  lazy-png job {lazy:6.2f}  ratio lazy/no-png = "
                  f"{lazy / off:.2f}  images/s {rates[n]:.0f} (bare {n / bare:.0f})")
            print(f"{'':7} written: bare {bare_bytes / 1e9:.3f} GB, job "
                  f"{res['artifact_bytes'] / 1e9:.3f} GB ({res['artifacts']} files); no-png "
                  f"job: post {off_job['post_s']:.2f} queued {off_job['queued_s']:.2f} run "
                  f"{off_job['run_s']:.2f} (load {t['load_s']:.2f} forward "
                  f"{t['forward_s']:.2f} stats {t['encode_npy_s']:.2f} store "
                  f"{t['storage_s']:.2f})")
            print(f"{'':7} CPU seconds (less sensitive to other load than wall time): bare "
                  f"{min(cpus['bare']):.2f}, no-png job's worker {min(cpus['off']):.2f}, ratio "
                  f"{min(cpus['bare']) / min(cpus['off']):.2f}")
    small, large = sizes
    print(f"images/s x{large} / x{small} = {rates[large] / rates[small]:.2f} (the cost per image "
          "does not grow with N when >= 1)")


def main() -> None:
    args = model_bench_args(__doc__, rounds=15, smoke="a few rounds, 16-image jobs", extra=[
        ("--reps", {"type": int, "default": 5, "help": "batches per timed window"}),
        ("--scale-only", {"action": "store_true", "help": "only the dataset-scale jobs"})])
    device = args.device
    if args.scale_only:
        scale(device.type, args.smoke)
        return
    throughput(device, 3 if args.smoke else args.rounds, 1 if args.smoke else args.reps)
    if not args.no_e2e:
        end_to_end(device.type, args.smoke)
        scale(device.type, args.smoke)


if __name__ == "__main__":
    main()
