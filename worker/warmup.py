"""One-time costs paid when a worker starts, before it says ready (worker/app.py), instead of
by its first job: parsing the digits, and torch's lazy set-up of autograd, oneDNN and the
optimizer (its first optimizer imports torch._dynamo: 1-3 s), which made a worker's first
1-epoch digits job far slower than the next one (measured in bench/RESULTS.md)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

log = logging.getLogger(__name__)

_done = threading.Event()
_done.set()  # nothing to wait for until start() is called


def _run() -> None:
    t0 = time.perf_counter()
    try:
        import torch

        from convoy import datasets
        from convoy.jobspec import TrainConfig
        from models.build import build_model
        from models.presets import digits_cnn
        from models.spec import ModelSpec
        from worker.train import DeviceData, make_optimizer, train

        split = datasets.load_digits()
        spec = ModelSpec.model_validate(digits_cnn(4))
        cfg = TrainConfig(epochs=1, batch_size=256)
        # a GPU worker also creates its CUDA context and loads its kernels now (seconds)
        devices = [torch.device("cpu")] + ([torch.device("cuda")]
                                           if torch.cuda.is_available() else [])
        for device in devices:
            model = build_model(spec).to(device)
            data = DeviceData.from_numpy(split, device)
            train(model, data, cfg, optimizer=make_optimizer(model, cfg))
        log.info("warm-up done in %.2f s at %s", time.perf_counter() - t0,
                 datetime.now(UTC).isoformat())
    except Exception:  # a failed warm-up only means the first job pays these costs
        log.warning("warm-up failed", exc_info=True)
    finally:
        _done.set()


def start() -> None:
    """Warm up on a thread; wait() until it is done."""
    _done.clear()
    threading.Thread(target=_run, name="warm-up", daemon=True).start()


def wait() -> None:
    """A job waits for a warm-up still running, however long it takes (a first CUDA start can
    be slow): both use torch's global random generator, and a job's seed must give the same
    run whether or not it met the warm-up."""
    while not _done.wait(60):
        log.warning("a job is waiting for the worker's warm-up (over 60 s so far)")
