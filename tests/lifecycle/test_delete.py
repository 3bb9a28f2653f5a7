"""DELETE of jobs and uploads, GET /v1/usage and the storage quota, through the real stack:
after a DELETE the job's store keys are gone, its rows too (404), the tenant's usage drops
by their size; another tenant's DELETE is a 404; a queued or running job (or one a job
uses) is a 409; past CONVOY_MAX_STORAGE_BYTES_PER_TENANT submissions and uploads get 413
with the tenant's usage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.factories import dataset_npz, dataset_upload, train_request
from tests.reliability.infra import api_without_workers
from tests.services import Stack, wait_job

LIMIT = 120_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with api_without_workers(Path(tmp_path_factory.mktemp("delete")),
                             max_storage_bytes_per_tenant=LIMIT) as s:
        s.start_worker("w0")
        yield s


def tenant_client(stack: Stack, tenant: str) -> httpx.Client:
    with stack.client() as admin:
        token = admin.post("/v1/tokens", json={"tenant": tenant}).json()["token"]
    return stack.client(token)


def job_files(stack: Stack, job_id: str) -> list[Path]:
    folder = Path(stack.env["CONVOY_HOME"]) / "artifacts" / "jobs" / job_id
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_delete_job_frees_its_files_and_usage(stack: Stack) -> None:
    with tenant_client(stack, "alice") as alice, tenant_client(stack, "mallory") as mallory:
        job_id = alice.post("/v1/jobs", json=train_request(2)).json()["id"]
        assert wait_job(alice, job_id)["state"] == "succeeded"
        listed = alice.get(f"/v1/jobs/{job_id}/checkpoints").json()
        files = job_files(stack, job_id)
        assert len(files) == 4  # 2 checkpoints and their optimizer states
        size = sum(p.stat().st_size for p in files)
        before = alice.get("/v1/usage").json()
        assert before["artifact_bytes"] == size
        assert before["jobs"] == 1 and before["artifacts"] == 4
        assert before["limit_bytes"] == LIMIT

        r = mallory.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 404, r.text
        assert len(job_files(stack, job_id)) == 4

        assert alice.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert alice.get(f"/v1/jobs/{job_id}").status_code == 404
        assert alice.get(f"/v1/jobs/{job_id}/checkpoints/{listed[0]['name']}").status_code \
            == 404
        assert job_files(stack, job_id) == []
        after = alice.get("/v1/usage").json()
        assert before["bytes"] - after["bytes"] == size > 0
        assert after["jobs"] == 0 and after["artifacts"] == 0
        assert alice.delete(f"/v1/jobs/{job_id}").status_code == 404


def test_active_job_and_used_upload_are_409(stack: Stack) -> None:
    with tenant_client(stack, "bob") as bob:
        up = bob.post("/v1/datasets", **dataset_upload(dataset_npz(40))).json()
        long = train_request(1000, dataset={"id": up["id"]}, batch_size=8)
        job_id = bob.post("/v1/jobs", json=long).json()["id"]
        r = bob.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 409 and "cancel it first" in r.json()["detail"]
        r = bob.delete(f"/v1/uploads/{up['id']}")
        assert r.status_code == 409 and job_id in r.json()["detail"]
        assert bob.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
        wait_job(bob, job_id, states=("canceled",))
        key = Path(stack.env["CONVOY_HOME"]) / "artifacts" / "uploads" / "datasets"
        assert (key / f"{up['id']}.npz").exists()
        assert bob.delete(f"/v1/uploads/{up['id']}").status_code == 204
        assert not (key / f"{up['id']}.npz").exists()
        assert bob.get(f"/v1/datasets/{up['id']}").status_code == 404
        assert bob.delete(f"/v1/uploads/{up['id']}").status_code == 404
        assert bob.delete(f"/v1/jobs/{job_id}").status_code == 204


def test_storage_quota(stack: Stack) -> None:
    blob = dataset_npz(200)  # about 52 kB
    with tenant_client(stack, "carol") as carol:
        first = carol.post("/v1/datasets", **dataset_upload(blob)).json()
        second = carol.post("/v1/datasets", **dataset_upload(dataset_npz(200, seed=1))).json()
        r = carol.post("/v1/datasets", **dataset_upload(dataset_npz(200, seed=2)))
        assert r.status_code == 413, r.text
        held = first["size"] + second["size"]
        assert f"holds {held} bytes" in r.json()["detail"]
        assert "max_storage_bytes_per_tenant" in r.json()["detail"]
        usage = carol.get("/v1/usage").json()
        assert usage["upload_bytes"] == held and usage["uploads"] == 2

        # a job's checkpoints take the tenant past the limit: the next submission is a 413
        keep_all = train_request(3)
        keep_all["checkpoints"] = {"keep_last": None}
        job_id = carol.post("/v1/jobs", json=keep_all).json()["id"]
        assert wait_job(carol, job_id)["state"] == "succeeded"
        assert carol.get("/v1/usage").json()["bytes"] > LIMIT
        r = carol.post("/v1/jobs", json=train_request(1))
        assert r.status_code == 413 and "storage is full" in r.json()["detail"], r.text

        assert carol.delete(f"/v1/uploads/{first['id']}").status_code == 204
        assert carol.delete(f"/v1/uploads/{second['id']}").status_code == 204
        assert carol.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert carol.get("/v1/usage").json()["bytes"] == 0
        assert carol.post("/v1/jobs", json=train_request(1)).status_code == 201
