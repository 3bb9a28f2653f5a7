"""A job canceled while its worker is SIGKILLed. The job is `canceled`, so no lease expiry ever
requeues it, and the dead worker never ends its attempt: the attempt row stayed open (no
ended_at, no outcome) forever. The reconciler closes such orphaned attempt rows once their lease
has expired."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.infra import api_without_workers, attempts, slow_job, wait_for
from tests.services import Stack

LEASE_S = 3


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_without_workers(Path(tmp_path_factory.mktemp("orphans")), lease_seconds=LEASE_S,
                             reconcile_interval_seconds=0.5) as s:
        yield s


def test_cancel_while_the_worker_is_sigkilled_the_reconciler_closes_the_attempt(stack):
    url = stack.env["CONVOY_DATABASE_URL"]
    worker = stack.start_worker("w0")
    with stack.client() as client:
        job_id = client.post("/v1/jobs", json=slow_job(20)).json()["id"]
        wait_for(lambda: attempts(url, job_id), timeout=40, every=0.05, what="the claim")
        # the same moment: the worker dies, the cancel lands; neither closes the attempt
        Stack.kill(worker, signal.SIGKILL)
        r = client.post(f"/v1/jobs/{job_id}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "canceled"
        killed = time.monotonic()
        [(attempt, worker_id, _, ended_at, outcome)] = attempts(url, job_id)
        assert (attempt, worker_id, ended_at, outcome) == (1, "w0", None, None)

        [closed] = wait_for(lambda: [a for a in attempts(url, job_id) if a[3] is not None],
                            timeout=LEASE_S + 15, every=0.1, what="the attempt to be closed")
        took = time.monotonic() - killed
        assert closed[4] == "canceled", closed
        assert closed[3] >= closed[2]
        assert took < LEASE_S + 10, f"closed {took:.1f} s after the kill"
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "canceled" and job["attempt"] == 1
        logs = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]
        assert any("attempt 1 of worker w0 closed as canceled" in m
                   and "never ended the attempt" in m for m in logs), logs
    assert len(attempts(url, job_id)) == 1
