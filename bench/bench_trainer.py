"""Trainer throughput: images/s through worker.train.train over a bare PyTorch loop (same
model, data, batch size, epochs, threads), interleaved ABAB, medians; and the CPU thread-count
experiment that sets settings.torch_threads.

    python -m bench.bench_trainer [--model vgg-small|airbench|digits] [--smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import busy_core, machine, median, pick_device
from convoy import datasets
from convoy.jobspec import TrainConfig
from models.build import build_model
from models.presets import digits_cnn
from models.spec import ModelSpec
from worker.control import Progress, Stopped
from worker.train import DeviceData, train

DIGITS_CNN = digits_cnn()


def airbench_spec(num_classes: int, widths: tuple[int, int, int] = (64, 256, 256)
                  ) -> dict[str, Any]:
    """airbench94's shape (KellerJordan/cifar10-airbench) as a Convoy spec: a 2x2 stem
    conv, then three blocks of conv-pool-bn-gelu-conv-bn-gelu, max-pool, linear."""
    def conv(out: int, k: int = 3, p: int = 1) -> dict[str, Any]:
        return {"type": "conv2d", "out_channels": out, "kernel_size": k, "padding": p,
                "bias": False}

    layers: list[dict[str, Any]] = [conv(24, 2, 0), {"type": "gelu"}]
    for w in widths:
        layers += [conv(w), {"type": "maxpool2d", "kernel_size": 2},
                   {"type": "batchnorm2d"}, {"type": "gelu"},
                   conv(w), {"type": "batchnorm2d"}, {"type": "gelu"}]
    layers += [{"type": "adaptive_avgpool2d", "output_size": 1}, {"type": "flatten"},
               {"type": "linear", "out_features": num_classes, "bias": False}]
    return {"input_shape": [3, 32, 32], "num_classes": num_classes, "layers": layers}


def load(name: str, samples: int, widths: tuple[int, int, int] = (64, 256, 256)
         ) -> tuple[dict[str, Any], datasets.Split]:
    if name == "digits":
        return DIGITS_CNN, datasets.load_digits()
    split = datasets.load_synthetic(datasets.SyntheticRef(name="synthetic", samples=samples))
    classes = int(split.y_train.max()) + 1
    spec = {"preset": "vgg-small", "num_classes": classes} if name == "vgg-small" \
        else airbench_spec(classes, widths)
    return spec, split


def fresh_model(spec: dict[str, Any], device: torch.device, seed: int = 0) -> nn.Module:
    """The same initial weights every run, prepared the way worker.runner prepares them."""
    torch.manual_seed(seed)
    model = build_model(ModelSpec.model_validate(spec)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return model


def bare_loop(model: nn.Module, data: DeviceData, cfg: TrainConfig) -> None:
    """What one writes by hand (pytorch/examples, airbench): randperm slices, an eval pass
    per epoch, one host sync per epoch. No callbacks, no progress, no NaN check."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    cuda = data.x_train.device.type == "cuda"
    n = len(data.x_train)
    for _ in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, device=data.x_train.device)
        total = torch.zeros((), device=data.x_train.device)
        for i in range(0, n, cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            if cuda:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    logits = model(data.x_train[idx])
            else:
                logits = model(data.x_train[idx])
            loss = F.cross_entropy(logits.float(), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        model.eval()
        correct = torch.zeros((), device=data.x_train.device, dtype=torch.long)
        with torch.no_grad():
            for i in range(0, len(data.x_val), 1024):
                if cuda:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = model(data.x_val[i:i + 1024])
                else:
                    out = model(data.x_val[i:i + 1024])
                correct += (out.argmax(1) == data.y_val[i:i + 1024]).sum()
        total.item(), correct.item()


def service_loop(model: nn.Module, data: DeviceData, cfg: TrainConfig) -> None:
    # with the callbacks the runner passes (a cheap should_stop, on_epoch), minus the files
    train(model, data, cfg, should_stop=lambda: False, on_epoch=lambda report: None)


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds). With one torch thread the CPU time is
    the work itself, barely moved by other processes on a shared box; wall time is not."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def throughput(args: argparse.Namespace, device: torch.device) -> None:
    spec, split = load(args.model, args.samples,
                       tuple(int(w) for w in args.airbench_widths.split(",")))
    data = DeviceData.from_numpy(split, device)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=0.02, momentum=0.9)
    images = len(split.x_train) * cfg.epochs
    # warm-up: first-call allocations, cudnn autotuning, thread pool start
    short = cfg.model_copy(update={"epochs": 1})
    bare_loop(fresh_model(spec, device), data, short)
    service_loop(fresh_model(spec, device), data, short)
    bare: list[tuple[float, float]] = []
    svc: list[tuple[float, float]] = []
    for _ in range(args.repeats):  # ABAB: drift on a shared box hits both sides alike
        bare.append(timed(lambda: bare_loop(fresh_model(spec, device), data, cfg), device))
        svc.append(timed(lambda: service_loop(fresh_model(spec, device), data, cfg), device))
    b, s = images / median([w for w, _ in bare]), images / median([w for w, _ in svc])
    pairs = median([bw / sw for (bw, _), (sw, _) in zip(bare, svc, strict=True)])
    print(f"trainer model={args.model} device={device} train_images={len(split.x_train)} "
          f"epochs={cfg.epochs} batch={cfg.batch_size} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    print(f"  bare loop      {b:10.1f} images/s  (runs: "
          f"{', '.join(f'{images / w:.0f}' for w, _ in bare)})")
    print(f"  worker.train   {s:10.1f} images/s  (runs: "
          f"{', '.join(f'{images / w:.0f}' for w, _ in svc)})")
    print(f"  ratio train/bare = {s / b:.3f} (medians), {pairs:.3f} (median of ABAB pairs)"
          f"  (goal >= 0.97)")
    if device.type == "cpu":
        bc, sc = median([c for _, c in bare]), median([c for _, c in svc])
        print(f"  by process CPU time: bare {images / bc:.1f}, train {images / sc:.1f} "
              f"images/CPU-s, ratio {bc / sc:.3f}")


def digits_rate(data: DeviceData, threads: int, budget_s: float) -> float:
    """Images/s of the digits CNN at batch 32 through worker.train, stopped after budget_s."""
    torch.set_num_threads(threads)
    model = fresh_model(DIGITS_CNN, data.x_train.device)
    cfg = TrainConfig(epochs=1000, batch_size=32, lr=0.05)
    progress = Progress()
    t0 = time.perf_counter()
    with contextlib.suppress(Stopped):
        train(model, data, cfg, progress=progress, check_every_s=0.05,
              should_stop=lambda: time.perf_counter() - t0 > budget_s)
    elapsed = time.perf_counter() - t0
    return progress.value * cfg.epochs * len(data.x_train) / elapsed


def thread_experiment(args: argparse.Namespace) -> None:
    data = DeviceData.from_numpy(datasets.load_digits(), torch.device("cpu"))
    digits_rate(data, 1, 0.3)  # warm-up
    results: dict[tuple[str, int], list[float]] = {}
    for load_name in ("idle", "busy"):
        ctx = busy_core() if load_name == "busy" else _nothing()
        with ctx:
            time.sleep(0.2 if load_name == "busy" else 0)
            for _ in range(args.repeats):
                for threads in (1, 2):
                    results.setdefault((load_name, threads), []).append(
                        digits_rate(data, threads, args.budget))
    torch.set_num_threads(args.threads)
    print("threads: digits CNN (16 filters), batch 32, worker.train, CPU; 'busy' = one "
          "spinning process on the other core")
    for load_name in ("idle", "busy"):
        one, two = median(results[(load_name, 1)]), median(results[(load_name, 2)])
        print(f"  other core {load_name}: 1 thread {one:9.0f} images/s, 2 threads "
              f"{two:9.0f} images/s, 1/2 = {one / two:.2f}x")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=["vgg-small", "airbench", "digits"], default="vgg-small")
    p.add_argument("--device", default="auto")
    p.add_argument("--airbench-widths", default="64,256,256", help="the three block widths")
    p.add_argument("--samples", type=int, default=1024, help="synthetic samples (80%% train)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the ratio")
    p.add_argument("--budget", type=float, default=2.0, help="seconds per thread-count run")
    p.add_argument("--no-threads", action="store_true", help="skip the thread experiment")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: proves the script runs")
    args = p.parse_args()
    if args.smoke:
        args.samples, args.epochs, args.repeats, args.budget = 64, 1, 1, 0.2
    torch.set_num_threads(args.threads)
    device = torch.device(pick_device(args.device))
    print(machine())
    throughput(args, device)
    if device.type == "cpu" and not args.no_threads:
        thread_experiment(args)


if __name__ == "__main__":
    main()
