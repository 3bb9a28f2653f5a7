"""Does the CIFAR-sized synthetic task (`synthetic`, task `scenes`) reward residual blocks
and augmentation? Trains resnet-small and the same network without its shortcuts ("plain":
every block's layers in sequence, projection blocks included) with and without the CIFAR
augmentation (random_crop padding 4, hflip), same data, seed and budget, one after the
other in one run, and prints each run's validation accuracy and the differences.

    python -m bench.bench_scenes [--samples 4000] [--epochs 8] [--smoke]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import machine
from convoy import datasets
from convoy.jobspec import TrainConfig
from models.build import build_model
from models.presets import resnet_small
from models.spec import ModelSpec
from worker.train import DeviceData, train

AUGMENT = {"random_crop": {"padding": 4}, "hflip": True}


def plain_layers(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same layers with every residual block unrolled: no shortcut, no sum."""
    out: list[dict[str, Any]] = []
    for layer in layers:
        out += layer["layers"] if layer["type"] == "residual" else [layer]
    return out


def run(layers: list[dict[str, Any]], split: datasets.Split, *, epochs: int,
        augment: dict[str, Any] | None, device: torch.device) -> tuple[float, float]:
    spec = ModelSpec.model_validate({"input_shape": [3, 32, 32], "num_classes": 10,
                                     "layers": layers})
    cfg = TrainConfig.model_validate({"epochs": epochs, "batch_size": 64, "lr": 0.05,
                                      "momentum": 0.9, "weight_decay": 5e-4,
                                      "lr_schedule": "cosine", "seed": 0, "augment": augment})
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device)
    started = time.perf_counter()
    result = train(model, DeviceData.from_numpy(split, device), cfg)
    return float(result["val_accuracy"]), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resnet-only", action="store_true",
                        help="skip the plain network (augmentation's effect alone)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.epochs = 60, 1
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    split = datasets.load_synthetic(datasets.SyntheticRef.model_validate(
        {"name": "synthetic", "task": "scenes", "samples": args.samples}))
    print(f"# {machine()}  device={device}  scenes samples={args.samples} "
          f"(train {len(split.y_train)}, val {len(split.y_val)})  epochs={args.epochs}")
    resnet = resnet_small(10)
    rows: dict[tuple[str, bool], float] = {}
    nets = [("resnet-small", resnet), ("plain (no shortcuts)", plain_layers(resnet))]
    for name, layers in nets[:1] if args.resnet_only else nets:
        for aug in (False, True):
            acc, seconds = run(layers, split, epochs=args.epochs,
                               augment=AUGMENT if aug else None, device=device)
            rows[(name, aug)] = acc
            print(f"{name:22s} augment={'yes' if aug else 'no ':3s}  val_accuracy={acc:.3f}  "
                  f"({seconds:.0f} s)", flush=True)
    if not args.resnet_only:
        for aug in (False, True):
            print(f"residual - plain (augment={'yes' if aug else 'no'}): "
                  f"{rows[('resnet-small', aug)] - rows[('plain (no shortcuts)', aug)]:+.3f}")
    for name, _ in nets[:1] if args.resnet_only else nets:
        print(f"augment - none ({name}): {rows[(name, True)] - rows[(name, False)]:+.3f}")


if __name__ == "__main__":
    main()
