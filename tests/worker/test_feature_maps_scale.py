"""Feature maps at dataset scale, through the real API, Redis, PostgreSQL and a real Celery
worker: a 20,000-image job over every layer of vgg-small (no pooling) streams its maps to
the store batch by batch, so the worker's peak RSS (VmHWM, from /proc) stays within 1.5x of
a 500-image job's, and its .npy files equal, row for row, the 500-image job's maps.

vgg-small runs here on the synthetic dataset's smallest images (3x8x8, the preset sized to
its input): 20,000 images through every layer then store 1.8 GB, under the default
max_feature_map_bytes (2 GiB); larger images would only make the test slower and the files
larger, not the bound different."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import numpy as np
import pytest

from tests.factories import feature_maps_request
from tests.services import Stack, api_alone, status_kib, wait_job

VGG = {"preset": "vgg-small", "input_shape": [3, 8, 8], "num_classes": 4}
DATASET = {"name": "synthetic", "samples": 20_000, "size": 8, "channels": 3, "num_classes": 4}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[Stack]:
    """The API alone: each job below gets a fresh worker, so that its VmHWM is its own."""
    home = tmp_path_factory.mktemp("scale")
    try:
        with api_alone(home, database_url=pg_url, queue_prefix="convoy-scale") as stack:
            yield stack
    finally:
        shutil.rmtree(home / "artifacts", ignore_errors=True)  # 1.8 GB of maps


def run_alone(stack: Stack, indices: object, name: str) -> tuple[dict, int, float]:
    """The job on a worker of its own: the finished job, the worker's peak RSS in KiB, and
    the job's wall time."""
    with stack.client() as client:
        r = client.post("/v1/jobs", json=feature_maps_request(
            {"model": VGG, "seed": 0}, inputs={"dataset": DATASET, "indices": indices}))
        assert r.status_code == 201, r.text
        t = time.perf_counter()
        proc = stack.start_worker(name)
        try:
            job = wait_job(client, r.json()["id"], timeout=900)
            peak = status_kib(proc.pid, "VmHWM")
        finally:
            stack.kill(proc)
            stack.workers.remove(proc)
    assert job["state"] == "succeeded", job["error"]
    return job, peak, time.perf_counter() - t


@pytest.mark.timeout(1200)
def test_a_20000_image_job_streams_in_the_memory_of_a_500_image_job(api: Stack) -> None:
    small, small_peak, small_s = run_alone(api, {"start": 0, "stop": 500}, "small")
    big, big_peak, big_s = run_alone(api, "all", "big")
    print(f"\nvgg-small 3x8x8, every layer: 500 images: peak RSS {small_peak >> 10} MiB, "
          f"{small_s:.1f} s; 20,000 images: peak RSS {big_peak >> 10} MiB, {big_s:.1f} s "
          f"({big['result']['bytes_stored'] / 1e9:.2f} GB stored)")
    assert big["result"]["images"] == 20_000 and small["result"]["images"] == 500
    assert big["progress"] == 1
    assert big_peak < 1.5 * small_peak, (big_peak, small_peak)

    root = api.home / "artifacts"
    with api.client() as client:
        layers = {job["id"]: client.get(f"/v1/jobs/{job['id']}/feature-maps").json()["layers"]
                  for job in (small, big)}
    names = [m["name"] for m in layers[small["id"]]]
    assert names == [m["name"] for m in layers[big["id"]]] and len(names) == 24
    for name in names:
        few = np.load(root / "jobs" / small["id"] / "feature-maps" / f"{name}.npy")
        many = np.load(root / "jobs" / big["id"] / "feature-maps" / f"{name}.npy",
                       mmap_mode="r")
        assert many.shape == (20_000, *few.shape[1:]), name
        assert np.array_equal(many[:500], few), name
    # the stats were accumulated batch by batch over all 20,000 images
    relu = next(m for m in layers[big["id"]] if m["type"] == "relu")
    maps = np.load(root / "jobs" / big["id"] / "feature-maps" / f"{relu['name']}.npy",
                   mmap_mode="r")
    assert relu["stats"]["max"] == [float(v) for v in maps.max(axis=(0, 2, 3))]


@pytest.mark.timeout(600)
def test_progress_counts_images_and_cancel_stops_between_batches(api: Stack) -> None:
    proc = api.start_worker("cancel")
    try:
        with api.client() as client:
            r = client.post("/v1/jobs", json=feature_maps_request(
                {"model": VGG, "seed": 0}, inputs={"dataset": DATASET, "indices": "all"}))
            assert r.status_code == 201, r.text
            job_id = r.json()["id"]
            seen: list[float] = []
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job_id}").json()
                assert job["state"] in ("queued", "running"), job
                if job["state"] == "running" and job["progress"] > 0:
                    seen.append(job["progress"])
                    if job["progress"] >= 0.1:
                        break
                time.sleep(0.1)
            assert seen and 0 < seen[-1] < 0.99, seen
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
            done = wait_job(client, job_id, timeout=120)
            assert done["state"] == "canceled"
            # the next job runs: the worker stopped this one between two batches
            nxt = client.post("/v1/jobs", json=feature_maps_request(
                {"model": VGG, "seed": 0}, inputs={"dataset": DATASET, "indices": [0, 1]}))
            assert wait_job(client, nxt.json()["id"], timeout=120)["state"] == "succeeded"
    finally:
        api.kill(proc)
        api.workers.remove(proc)
    assert seen == sorted(seen)
    # no half-written layer file is left behind (the streamed writes were given up)
    folder = api.home / "artifacts" / "jobs" / job_id
    assert not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]
