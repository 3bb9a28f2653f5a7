"""The baseline for bench_ddp: a bare DistributedDataParallel script, run under torchrun
(`python -m torch.distributed.run --standalone --nproc-per-node N bench/bare_ddp.py ...`):
the same model, data, global batch and one thread per rank as a Convoy job, none of Convoy
(no database, lease, checkpoints). Rank 0 prints one images/s figure per epoch as JSON."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from convoy import datasets
from models.build import build_model
from models.spec import ModelSpec


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    split = datasets.load_synthetic(datasets.SyntheticRef(name="synthetic",
                                                          samples=args.samples))
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    classes = int(y.max()) + 1
    torch.manual_seed(0)
    spec = ModelSpec.model_validate({"preset": "vgg-small", "num_classes": classes})
    model = DistributedDataParallel(build_model(spec))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    per_rank = args.batch_size // world
    rates = []
    for epoch in range(args.epochs):
        torch.manual_seed(epoch)
        perm = torch.randperm(len(x))
        start = time.perf_counter()
        for i in range(0, len(x), args.batch_size):
            idx = perm[i:i + args.batch_size][rank * per_rank:(rank + 1) * per_rank]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(x) / (time.perf_counter() - start))
    if rank == 0:
        print(json.dumps({"world": world, "images_per_second": rates,
                          "pid": os.getpid()}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # as worker/rank.py: no interpreter teardown (gloo's threads have aborted it, once)
    os._exit(0)
