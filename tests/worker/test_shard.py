"""The pure parts of multi-device jobs: each rank's share of a batch, the devices a worker
owns, the queues by device count, and which rank's failure is named."""

from __future__ import annotations

import pytest

from convoy.queue import queue_for, worker_queues
from worker.ddp import Exit, root_cause
from worker.devices import Owned, parse
from worker.shard import Shard


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("batch", [7, 8, 43, 45, 64])
def test_the_shares_of_a_batch_are_contiguous_in_rank_order_and_differ_by_at_most_one(
        world: int, batch: int) -> None:
    if batch < world:
        return
    bounds = [Shard(r, world).bounds(batch) for r in range(world)]
    assert bounds[0][0] == 0 and bounds[-1][1] == batch
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_worker_devices_a_count_indices_or_the_default() -> None:
    assert parse("", visible_gpus=0).gpus == () and parse("", visible_gpus=0).count >= 1
    assert parse("", visible_gpus=4) == Owned((0, 1, 2, 3), 4)
    assert parse("3", visible_gpus=0) == Owned((), 3)
    assert parse("2", visible_gpus=4) == Owned((0, 1), 2)
    assert parse("8", visible_gpus=2) == Owned((0, 1), 2)  # no more than it sees
    assert parse("0,2,3", visible_gpus=4) == Owned((0, 2, 3), 3)
    assert parse("cuda:1", visible_gpus=4) == Owned((1,), 1)
    for bad in ("0", "-1", "two", "1,x", ","):
        with pytest.raises(ValueError, match="CONVOY_WORKER_DEVICES"):
            parse(bad, visible_gpus=0)


def test_an_n_device_job_goes_to_a_queue_read_by_every_worker_owning_n_and_no_other() -> None:
    assert queue_for("q", "cpu") == queue_for("q", "auto", 1) == "q"
    assert queue_for("q", "cpu", 3) == "q-x3" and queue_for("q", "cuda", 2) == "q-gpu-x2"
    for owned in range(1, 9):
        reads = set(worker_queues("q", gpu=True, owned=owned, max_devices=8))
        for n in range(1, 9):
            for device in ("cpu", "cuda", "auto"):
                assert (queue_for("q", device, n) in reads) == (n <= owned), (owned, n)
    assert worker_queues("q", gpu=False, owned=16, max_devices=4) == ["q", "q-x2", "q-x3",
                                                                     "q-x4"]


def test_the_rank_named_is_the_one_killed_not_the_peers_that_failed_after_it() -> None:
    killed = Exit(1, 11, -9, seen=5.0, error=None)
    echo = Exit(0, 10, 1, seen=4.9, error={"error": "Connection closed by peer", "time": 4.0,
                                           "raised": True})
    assert root_cause([echo, killed]) is killed
    assert killed.describe() == "rank 1 (pid 11) was killed by SIGKILL (exit -9)"
    first = Exit(1, 11, 1, seen=5.0, error={"error": "loss became NaN", "time": 3.0})
    assert root_cause([echo, first]) is first
    assert first.describe() == "rank 1 (pid 11) exited with code 1: loss became NaN"
