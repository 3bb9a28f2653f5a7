"""One rank of a multi-device train job: `python -m worker.rank JOB_ID RANK`, started by the
lease holder (worker/ddp.py) with torchrun's environment. Every rank trains its share of each
global batch through the same TrainRun as a one-device attempt; rank 0 alone writes
checkpoints, metrics and the result. A failure is written for the parent before exiting."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path


def push_progress(progress: object, stop: threading.Event) -> None:
    """Rank 0's progress, for the parent's lease heartbeat, through the store it hosts."""
    from torch.distributed import TCPStore

    from worker.ddp import PROGRESS_KEY

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                     is_master=False)
    while not stop.wait(0.5):
        store.set(PROGRESS_KEY, str(getattr(progress, "value", 0.0)))


def main(job_id: str, rank: int) -> int:
    rank_dir = Path(os.environ["CONVOY_RANK_DIR"])
    try:
        import torch
        import torch.distributed as dist

        from convoy.settings import get_settings
        from db import job_reads
        from db.session import session_scope
        from worker.shard import Shard
        from worker.train_job import TrainRun

        settings = get_settings()
        torch.set_num_threads(settings.torch_threads)
        device = os.environ["CONVOY_RANK_DEVICE"]
        world = int(os.environ["WORLD_SIZE"])
        if device == "cuda":
            torch.cuda.set_device(rank)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
        with session_scope(settings.database_url) as session:
            job = job_reads.get_job(session, job_id=job_id)
        run = TrainRun(settings, job, os.environ["CONVOY_WORKER_ID"],
                       shard=Shard(rank, world))
        stop = threading.Event()
        if rank == 0:
            threading.Thread(target=push_progress, args=(run.progress, stop),
                             daemon=True).start()
        result = run.train_rank(torch.device(device, rank) if device == "cuda"
                                else torch.device("cpu"))
        stop.set()
        if rank == 0:
            tmp = rank_dir / "result.json.tmp"
            tmp.write_text(json.dumps(result))
            tmp.rename(rank_dir / "result.json")
        dist.destroy_process_group()
        return 0
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then exit 1
        from worker.control import Stopped

        traceback.print_exc()
        message = ("stopped: the lease was lost" if isinstance(exc, Stopped)
                   else _message(exc))
        (rank_dir / f"rank-{rank}.error.json").write_text(json.dumps(
            {"error": message, "raised": not isinstance(exc, Stopped), "time": time.time(),
             "trace": traceback.format_exc()[-4000:]}))
        return 1


def _message(exc: BaseException) -> str:
    from worker.runner import failure_message

    return failure_message(exc)


if __name__ == "__main__":
    code = main(sys.argv[1], int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter teardown: the result is written and the group destroyed, and a C++
    # destructor aborting then (gloo's threads did, once, in bench/bare_ddp.py) must not turn
    # a finished rank into a lost one.
    os._exit(code)
