"""A full or read-only artifact store. The store is a real tmpfs mounted at the stack's artifact
root (tests run as root; chmod would not stop root), remounted read-only or shrunk to be full
while jobs run. Storage errors are a retryable attempt outcome: the job goes back to `queued`
(attempt + 1, a backoff) with the store and the errno in its log, fails only when its attempts
run out, and succeeds once the store is writable again; no file is ever left without its row;
uploads answer 507 naming the store.

If this machine does not allow mounting a tmpfs the fixture fails (it never skips)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from tests.factories import npz_bytes
from tests.reliability.infra import api_without_workers, attempts, sync_url, tiny_job, wait_for
from tests.services import Stack, wait_job


def mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.fail(f"mount {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}"
                    " -- these tests need root and permission to mount a tmpfs")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = Path(tmp_path_factory.mktemp("store"))
    root = home / "artifacts"
    root.mkdir()
    mount("-t", "tmpfs", "-o", "size=64m,mode=0755", "convoy-test-store", str(root))
    try:
        with api_without_workers(home, reconcile_interval_seconds=0.5, store_retry_seconds=1,
                                 store_retry_max_seconds=2) as s:
            s.start_worker("w0")
            yield s
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False, timeout=30)


def root_of(stack: Stack) -> Path:
    return Path(stack.env["CONVOY_HOME"]) / "artifacts"


def train_job(max_attempts: int, seed: int = 0) -> dict[str, Any]:
    job = tiny_job(seed)
    job["train"]["epochs"] = 2
    job["max_attempts"] = max_attempts
    return job


def npz() -> bytes:
    return npz_bytes(x=np.zeros((32, 1, 8, 8), np.float32), y=np.arange(32) % 2)  # > 1 page


def upload(client: Any) -> Any:
    return client.post("/v1/datasets", files={"file": ("d.npz", npz())})


def files_and_rows(stack: Stack, job_id: str) -> tuple[set[str], set[str]]:
    """Keys of the files under the job's folder, keys of its artifact rows."""
    folder = root_of(stack) / "jobs" / job_id
    files = {str(p.relative_to(root_of(stack))) for p in folder.rglob("*") if p.is_file()} \
        if folder.exists() else set()
    with psycopg.connect(sync_url(stack.env["CONVOY_DATABASE_URL"])) as conn:
        rows = {k for (k,) in conn.execute("SELECT key FROM artifacts WHERE job_id = %s",
                                          (job_id,))}
    return files, rows


def between_attempts(stack: Stack, client: Any, job_id: str) -> tuple[set[str], set[str]]:
    """files_and_rows while the job waits `queued` (the same attempt before and after the
    look), so that no attempt was writing meanwhile."""
    def look() -> tuple[set[str], set[str]] | None:
        before = client.get(f"/v1/jobs/{job_id}").json()
        seen = files_and_rows(stack, job_id)
        after = client.get(f"/v1/jobs/{job_id}").json()
        same = (before["state"], before["attempt"]) == (after["state"], after["attempt"])
        return seen if same and before["state"] == "queued" and before["attempt"] >= 2 \
            else None

    return wait_for(look, timeout=30, every=0.05, what=f"{job_id} queued between attempts")


def logs_of(client: Any, job_id: str) -> list[str]:
    return [line["message"] for line in client.get(f"/v1/jobs/{job_id}/logs").json()]


def test_a_read_only_store_is_retried_and_the_job_succeeds_once_writable(stack):
    root = root_of(stack)
    url = stack.env["CONVOY_DATABASE_URL"]
    mount("-o", "remount,ro", str(root))
    try:
        with stack.client() as client:
            r = upload(client)
            assert r.status_code == 507, r.text
            assert "artifact store" in r.json()["detail"] and "EROFS" in r.json()["detail"]
            assert r.headers["retry-after"]

            patient = client.post("/v1/jobs", json=train_job(max_attempts=20)).json()["id"]
            brief = client.post("/v1/jobs", json=train_job(max_attempts=2, seed=1)).json()["id"]

            # attempts run out: failed, saying which store and why, each attempt store_error
            failed = wait_job(client, brief, timeout=40)
            assert failed["state"] == "failed", failed
            assert failed["attempt"] == 2
            assert "artifact store" in failed["error"] and "EROFS" in failed["error"]
            assert [o for *_, o in attempts(url, brief)] == ["store_error", "store_error"]

            # the other one is retried, not failed, while the store stays read-only
            wait_for(lambda: client.get(f"/v1/jobs/{patient}").json()["attempt"] >= 3,
                     timeout=40, what="two retries of the patient job")
            job = client.get(f"/v1/jobs/{patient}").json()
            assert job["state"] in ("queued", "running") and job["error"] is None, job
            logs = logs_of(client, patient)
            assert any("attempt 1 stopped by a storage error: artifact store" in m
                       and "EROFS" in m and "queued again, attempt 2 of 20" in m
                       for m in logs), logs
    finally:
        mount("-o", "remount,rw", str(root))

    with stack.client() as client:
        done = wait_job(client, patient, timeout=40)
        assert done["state"] == "succeeded", done["error"]
        assert done["attempt"] >= 3 and done["result"]["epochs_done"] == 2
        outcomes = [o for *_, o in attempts(url, patient)]
        assert outcomes[-1] == "succeeded" and set(outcomes[:-1]) == {"store_error"}, outcomes
        files, rows = files_and_rows(stack, patient)
        assert files == rows and len(rows) == 4  # model + optimizer for 2 epochs
        assert upload(client).status_code == 201


def test_a_full_store_leaves_no_file_without_its_row_and_the_job_succeeds_once_freed(stack):
    """The store has room for the epoch's model file but not its optimizer file: the model
    file that did get written must go too (the orphan `epoch-0007.safetensors` of the
    report)."""
    root = root_of(stack)
    st = os.statvfs(root)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    page = st.f_frsize
    mount("-o", f"remount,size={used + page}", str(root))  # one more page: the model file
    try:
        with stack.client() as client:
            r = upload(client)
            assert r.status_code == 507, r.text
            assert "artifact store" in r.json()["detail"] and "ENOSPC" in r.json()["detail"]

            job_id = client.post("/v1/jobs", json=train_job(max_attempts=20, seed=2)).json()["id"]
            files, rows = between_attempts(stack, client, job_id)
            assert files == rows == set(), "a file was left without its row"
            logs = logs_of(client, job_id)
            # the model file fit and was written; the optimizer file did not
            assert any("storage error" in m and "ENOSPC" in m
                       and "epoch-0001.optimizer.safetensors" in m for m in logs), logs
            assert not [p for p in root.rglob(".tmp-*")], "temporary files left behind"
    finally:
        mount("-o", "remount,size=64m", str(root))

    with stack.client() as client:
        done = wait_job(client, job_id, timeout=40)
        assert done["state"] == "succeeded", done["error"]
        files, rows = files_and_rows(stack, job_id)
        assert files == rows and len(rows) == 4
