"""Data-parallel throughput on CPU: images/s of a compute-bound model (vgg-small on
synthetic 32x32 images) as a Convoy job with 1 and 2 devices (gloo, one thread per rank,
through the real API and worker), and as a bare torchrun DDP script with 1 and 2 ranks
(bench/bare_ddp.py), runs interleaved ABAB, medians of the epochs after the first.

    python -m bench.bench_ddp [--samples 2048] [--epochs 4] [--repeats 2] [--smoke]

Goals (issue 16): Convoy 2 ranks >= 1.6x Convoy 1 rank, and >= 0.95x bare torchrun 2 ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from bench.common import machine, median
from bench.stacks import service
from tests.services import ROOT, wait_job


def job(samples: int, epochs: int, devices: int) -> dict[str, Any]:
    return {
        "kind": "train", "name": f"bench-ddp-{devices}",
        "model": {"preset": "vgg-small", "num_classes": 4},
        "dataset": {"name": "synthetic", "samples": samples, "size": 32, "channels": 3,
                    "num_classes": 4},
        "train": {"epochs": epochs, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                  "momentum": 0.9, "seed": 0},
        "device": "cpu", "resources": {"devices": devices},
    }


def convoy_rate(client: Any, samples: int, epochs: int, devices: int) -> float:
    """Median images/s of the job's epochs after the first (warm-up) one."""
    job_id = client.post("/v1/jobs", json=job(samples, epochs, devices)).json()["id"]
    done = wait_job(client, job_id, timeout=3600)
    assert done["state"] == "succeeded", done["error"]
    points = client.get(f"/v1/jobs/{job_id}/metrics?name=images_per_second").json()
    return median([p["value"] for p in points["series"]["images_per_second"][1:]])


def bare_rate(samples: int, epochs: int, world: int) -> float:
    # the synthetic set splits off a validation part; the bare script trains on the same
    # training part, so images/s are comparable
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={world}", "--max-restarts=0", str(ROOT / "bench" / "bare_ddp.py"),
         "--samples", str(samples), "--epochs", str(epochs)],
        capture_output=True, text=True, timeout=3600, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    return median(json.loads(line)["images_per_second"][1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: does it run at all")
    args = p.parse_args()
    if args.smoke:
        args.samples, args.epochs, args.repeats = 256, 2, 1
    print(machine())
    rates: dict[str, list[float]] = {k: [] for k in ("convoy1", "convoy2", "bare1", "bare2")}
    with service("pg", CONVOY_WORKER_DEVICES="2") as stack, stack.client() as client:
        for _ in range(args.repeats):
            # ABAB: each pair side by side, so load from elsewhere hits both alike
            rates["convoy1"].append(convoy_rate(client, args.samples, args.epochs, 1))
            rates["convoy2"].append(convoy_rate(client, args.samples, args.epochs, 2))
            rates["bare1"].append(bare_rate(args.samples, args.epochs, 1))
            rates["bare2"].append(bare_rate(args.samples, args.epochs, 2))
            print({k: [round(v) for v in vs] for k, vs in rates.items()}, flush=True)
    m = {k: median(v) for k, v in rates.items()}
    print(f"vgg-small, {args.samples} synthetic samples, global batch 64, "
          f"{args.epochs} epochs x {args.repeats} (medians of epochs 2..):")
    for k in ("convoy1", "convoy2", "bare1", "bare2"):
        print(f"  {k:8s} {m[k]:8.1f} images/s")
    print(f"  Convoy 2 ranks / Convoy 1 rank      {m['convoy2'] / m['convoy1']:.2f}x "
          "(goal >= 1.6)")
    print(f"  Convoy 2 ranks / bare torchrun 2    {m['convoy2'] / m['bare2']:.2f}x "
          "(goal >= 0.95)")
    print(f"  bare torchrun 2 / bare 1            {m['bare2'] / m['bare1']:.2f}x")
    print(f"loadavg after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
