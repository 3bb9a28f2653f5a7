"""The devices a worker owns (CONVOY_WORKER_DEVICES): how many ranks a multi-device job may
have here, which queues the worker reads, and the CUDA_VISIBLE_DEVICES its ranks get."""

from __future__ import annotations

import os
from dataclasses import dataclass

from convoy.queue import gpu_queue, worker_queues
from convoy.settings import Settings


@dataclass(frozen=True)
class Owned:
    gpus: tuple[int, ...]  # CUDA indices (as the host numbers them); empty on a CPU host
    count: int  # ranks a job may have: len(gpus) on a GPU host, else CPU ranks

    def describe(self) -> str:
        if self.gpus:
            return f"{self.count} GPU(s) {','.join(map(str, self.gpus))}"
        return f"{self.count} CPU rank(s)"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1


def parse(text: str, *, visible_gpus: int) -> Owned:
    """A number N: the first N visible GPUs on a GPU host, else N CPU ranks; a list
    "0,2,3" or "cuda:1" names GPU indices; empty: every visible GPU, else the cores.
    ValueError naming the setting when it cannot be read."""
    text = text.strip()
    if not text:
        return Owned(tuple(range(visible_gpus)), visible_gpus) if visible_gpus \
            else Owned((), cores())
    try:
        if "," not in text and not text.startswith("cuda:"):
            n = int(text)
            if n < 1:
                raise ValueError
            if visible_gpus:
                return Owned(tuple(range(min(n, visible_gpus))), min(n, visible_gpus))
            return Owned((), n)
        ids = tuple(sorted({int(p.strip().removeprefix("cuda:")) for p in text.split(",")
                            if p.strip()}))
        if not ids or min(ids) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"CONVOY_WORKER_DEVICES={text!r}: expected a count (4) or GPU "
                         "indices (0,1 or cuda:1)") from None
    return Owned(ids, len(ids))


def visible_gpus() -> int:
    """How many CUDA devices this process sees (no CUDA context is made)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def owned(settings: Settings) -> Owned:
    return parse(settings.worker_devices, visible_gpus=visible_gpus())


def device_count_queues(settings: Settings, reading: list[str], devices: Owned) -> list[str]:
    """The device-count queues a worker reading `reading` (its -Q list) adds: for the main
    queue and the GPU queue among them, those of 2..the devices it owns."""
    added: list[str] = []
    for gpu in (False, True):
        base = gpu_queue(settings.queue) if gpu else settings.queue
        if base in reading:
            added += [q for q in worker_queues(base, gpu=False, owned=devices.count,
                                               max_devices=settings.max_devices_per_job)
                      if q != base]
    return added
