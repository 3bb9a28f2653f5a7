"""One job on N devices, the parent's side: the Celery task's process (which keeps the lease
and never touches CUDA here) starts N rank processes (`python -m worker.rank`) as one child
process group, with torchrun --standalone semantics: a TCPStore this process hosts on a free
port (no port race), RANK/WORLD_SIZE/LOCAL_RANK in each rank's environment, no restarts
(Convoy's leases do retries). It watches them: cancel, a lost lease or a warm shutdown kill
the whole group; the first rank to fail ends the attempt, named with its exit."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from convoy.settings import Settings
from worker.control import Progress, Stopped
from worker.devices import Owned, owned

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
POLL_S = 0.1
PROGRESS_KEY = "convoy/progress"


class RankLost(Exception):
    """A rank died without reporting an error (a signal, the OOM killer, os._exit): like a
    worker dying, not the job's fault, so the job is queued again (attempt + 1) and resumes
    from its last checkpoint."""


class RankFailed(Exception):
    """A rank raised (bad data, NaN loss...): the attempt fails with that rank's error, as a
    one-device attempt would."""


@dataclass(frozen=True)
class Plan:
    """Where a job's N ranks run: `backend` gloo on CPU, nccl on CUDA; `gpus` the host's
    indices given to the ranks as CUDA_VISIBLE_DEVICES (rank r uses cuda:r)."""

    world: int
    device: str  # "cpu" or "cuda"
    gpus: tuple[int, ...]

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    def text(self) -> str:
        where = f"GPUs {','.join(map(str, self.gpus))}" if self.device == "cuda" \
            else "CPU, one thread each"
        return f"{self.world} ranks ({self.backend}, {where})"


def plan(settings: Settings, *, wanted: str, world: int, devices: Owned | None = None) -> Plan:
    """The ranks' devices for a job asking for `world` devices of kind `wanted` (auto, cpu,
    cuda) on this worker; RuntimeError when it owns too few (routing sends a job only to
    workers owning enough; this guards a worker started with other queues)."""
    devices = devices or owned(settings)
    if wanted == "cuda" and not devices.gpus:
        raise RuntimeError("device 'cuda' was asked for but this worker owns no CUDA device")
    kind = "cuda" if wanted == "cuda" or (wanted == "auto" and devices.gpus) else "cpu"
    if world > devices.count:
        raise RuntimeError(f"the job asks for {world} devices; this worker owns "
                           f"{devices.describe()} (CONVOY_WORKER_DEVICES)")
    return Plan(world, kind, devices.gpus[:world] if kind == "cuda" else ())


def _die_with_parent() -> None:
    """In each rank before exec: should the worker die outright, its ranks get SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Exit:
    rank: int
    pid: int
    code: int
    seen: float  # when this process saw it end
    error: dict[str, Any] | None  # what the rank wrote before exiting, if it could

    def describe(self) -> str:
        if self.code < 0:
            try:
                name = signal.Signals(-self.code).name
            except ValueError:
                name = f"signal {-self.code}"
            how = f"was killed by {name} (exit {self.code})"
        else:
            how = f"exited with code {self.code}"
        what = f": {self.error['error']}" if self.error else ""
        return f"rank {self.rank} (pid {self.pid}) {how}{what}"


def root_cause(exits: list[Exit]) -> Exit:
    """The failure that started it: a rank killed by a signal cannot be the echo of another
    rank's failure (the others then fail in a collective), so it comes first; then the
    earliest error a rank wrote; then the first exit seen."""
    def key(e: Exit) -> tuple[int, float]:
        if e.code < 0:
            return 0, e.seen
        if e.error is not None:
            return 1, float(e.error.get("time", e.seen))
        return 2, e.seen

    return min(exits, key=key)


class Ranks:
    """N rank processes of one attempt, started, watched and stopped by the lease holder."""

    def __init__(self, settings: Settings, *, job_id: str, worker_id: str, plan: Plan) -> None:
        self.settings, self.job_id, self.worker_id, self.plan = (settings, job_id, worker_id,
                                                                 plan)
        self.dir = Path(tempfile.mkdtemp(prefix=f"convoy-ranks-{job_id[:12]}-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pgid = 0

    def env(self, rank: int, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(self.plan.world),
            "LOCAL_WORLD_SIZE": str(self.plan.world), "GROUP_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            # every rank a client of the store this process hosts (torchrun's agent store)
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "CONVOY_RANK_DIR": str(self.dir), "CONVOY_RANK_DEVICE": self.plan.device,
            "CONVOY_WORKER_ID": self.worker_id,
            "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.plan.gpus)),
        })
        if self.plan.device == "cpu":  # one torch thread per rank (threads x ranks <= cores)
            env.update({"OMP_NUM_THREADS": "1", "CONVOY_TORCH_THREADS": "1"})
        return env

    def start(self, port: int) -> None:
        for rank in range(self.plan.world):
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker.rank", self.job_id, str(rank)],
                env=self.env(rank, port), process_group=self.pgid,
                preexec_fn=_die_with_parent)
            self.pgid = self.pgid or proc.pid  # rank 0 leads the group, the others join it
            self.procs.append(proc)
        log.info("job %s: %s started, pids %s", self.job_id, self.plan.text(),
                 [p.pid for p in self.procs])

    def kill(self) -> None:
        """SIGKILL the whole group (ranks hold no state worth a grace period: checkpoints are
        written by the epoch and fenced by the lease), and reap every rank."""
        if self.pgid and any(p.poll() is None for p in self.procs):
            # (only while a member is left: once all are reaped the group id may be reused)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pgid, signal.SIGKILL)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()  # a rank that left the group (it cannot here, but be sure)
            proc.wait()

    def read_error(self, rank: int) -> dict[str, Any] | None:
        path = self.dir / f"rank-{rank}.error.json"
        try:
            found: dict[str, Any] = json.loads(path.read_text())
            return found
        except (OSError, ValueError):
            return None

    def run(self, *, progress: Progress, should_stop: Callable[[], bool]) -> dict[str, Any]:
        """Start the ranks and wait for them: rank 0's result, or Stopped (the group killed),
        RankLost / RankFailed naming the rank that failed first."""
        from torch.distributed import TCPStore

        store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        exits: dict[int, Exit] = {}
        try:
            self.start(store.port)
            last_progress = 0.0
            while len(exits) < len(self.procs):
                time.sleep(POLL_S)
                now = time.monotonic()
                for rank, proc in enumerate(self.procs):
                    if rank not in exits and (code := proc.poll()) is not None:
                        exits[rank] = Exit(rank, proc.pid, code, now,
                                           self.read_error(rank) if code else None)
                failed = [e for e in exits.values() if e.code != 0]
                if failed:
                    self.kill()
                    time.sleep(POLL_S)  # a peer's error file written as it went down
                    for e in failed:
                        e.error = e.error or self.read_error(e.rank)
                    first = root_cause(failed)
                    raise (RankFailed if first.error and first.error.get("raised")
                           else RankLost)(first.describe())
                if should_stop():
                    self.kill()
                    raise Stopped()
                if now - last_progress >= 0.5 and store.check([PROGRESS_KEY]):
                    last_progress = now
                    progress.value = float(store.get(PROGRESS_KEY))
            result: dict[str, Any] = json.loads((self.dir / "result.json").read_text())
            return result
        finally:
            self.kill()
            for path in self.dir.iterdir():
                path.unlink(missing_ok=True)
            self.dir.rmdir()
            del store
