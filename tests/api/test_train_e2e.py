"""A digits training job end to end through the API, Redis, a Celery worker and PostgreSQL."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load

from tests.checks import digits_val_accuracy
from tests.factories import train_request
from tests.services import TOKEN, wait_job

EPOCHS = 6


def test_digits_job_trains_and_its_checkpoint_reproduces_val_accuracy(client):
    request = train_request(EPOCHS, batch_size=32)
    r = client.post("/v1/jobs", json=request)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued"
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert [layer["output_shape"] for layer in job["summary"]["layers"]] == [
        [16, 8, 8], [16, 8, 8], [16, 4, 4], [256], [10]]

    done = wait_job(client, job["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["progress"] == 1.0
    assert done["result"]["val_accuracy"] > 0.9
    assert done["result"]["epochs_done"] == EPOCHS
    assert done["started_at"] and done["finished_at"] >= done["started_at"]

    series = client.get(f"/v1/jobs/{job['id']}/metrics").json()["series"]
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                 "images_per_second", "lr"):
        assert [p["epoch"] for p in series[name]] == list(range(1, EPOCHS + 1)), name
    only = client.get(f"/v1/jobs/{job['id']}/metrics", params={"name": "val_loss"}).json()
    assert list(only["series"]) == ["val_loss"]

    # the default retention: the 3 newest and the best by val_accuracy (ties: the newest)
    accuracy = {p["epoch"]: p["value"] for p in series["val_accuracy"]}
    best = max(accuracy, key=lambda e: (accuracy[e], e))
    checkpoints = client.get(f"/v1/jobs/{job['id']}/checkpoints").json()
    assert [c["epoch"] for c in checkpoints] == sorted({EPOCHS - 2, EPOCHS - 1, EPOCHS, best})
    last = checkpoints[-1]
    assert last["name"] == f"epoch-{EPOCHS:04d}.safetensors"
    r = client.get(f"/v1/jobs/{job['id']}/checkpoints/{last['name']}")
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == last["sha256"] == r.headers["x-sha256"]
    assert len(r.content) == last["size"]
    assert digits_val_accuracy(r.content, request["model"]) == done["result"]["val_accuracy"]


def test_same_seed_gives_the_same_run_on_cpu(client):
    ids = [client.post("/v1/jobs", json=train_request(2)).json()["id"] for _ in range(2)]
    a, b = (wait_job(client, i) for i in ids)
    assert a["state"] == b["state"] == "succeeded"
    assert a["result"]["val_loss"] == b["result"]["val_loss"]
    blobs = [client.get(f"/v1/jobs/{i}/checkpoints/last").content for i in ids]
    sa, sb = load(blobs[0]), load(blobs[1])
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_job_list_is_paginated_newest_first_and_filters(client):
    ids = [client.post("/v1/jobs", json=train_request(1)).json()["id"] for _ in range(3)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, "kind": "train", **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen[:3] == ids[::-1]
    assert len(seen) == len(set(seen))
    for job_id in ids:
        wait_job(client, job_id)
    finished = client.get("/v1/jobs", params={"state": "succeeded", "limit": 200}).json()
    assert set(ids) <= {j["id"] for j in finished["items"]}
    assert client.get("/v1/jobs", params={"state": "queued", "kind": "feature_maps"}).json()[
        "items"] == []


def test_the_api_process_never_loads_torch(stack, client):
    """DESIGN.md: the API image has no torch. After serving jobs, summaries, metrics and
    checkpoints (this module and the feature-map tests before it), the running API process
    has mapped no torch library; the worker, for contrast, has."""
    r = client.post("/v1/models/summary", json=train_request(1)["model"])
    assert r.status_code == 200, r.text

    def maps(pid: int) -> str:
        return Path(f"/proc/{pid}/maps").read_text()

    assert "libtorch" not in maps(stack.api.pid)
    assert "/torch/" not in maps(stack.api.pid)
    assert "libtorch" in maps(stack.workers[0].pid)


def test_a_short_job_in_one_request(stack):
    """The SDK's submit(wait_seconds=): POST /v1/jobs with `Prefer: wait`, answered with the
    finished job."""
    from client.sdk import Convoy

    with Convoy(stack.url, token=TOKEN) as sdk:
        job = sdk.submit(train_request(1), wait_seconds=30)
    assert job.state == "succeeded" and job.result["epochs_done"] == 1
