"""Downloading a 1 GiB artifact through the API raises the API's resident memory by less
than 64 MiB: the bytes are streamed from the store in chunks, from S3 and from the local
folder alike. The artifact is generated into the store directly (with its row, through db/).
One image of a 256 MiB feature-map file (`?image=k`) is read by range, not whole."""

from __future__ import annotations

import hashlib
import io
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from convoy.artifacts import upload_key
from db import uploads
from db.session import session_scope
from tests.factories import feature_maps_request
from tests.services import MemoryWatch, Stack, status_kib
from tests.storage.conftest import plant, plant_feature_map, store_of

GIB = 1 << 30
LIMIT = 64 << 20
BLOCK = 4 << 20


def generated() -> Iterator[bytes]:
    """1 GiB of non-repeating-looking bytes (each 4 MiB block differs), cheaply."""
    base = hashlib.sha256(b"convoy").digest() * (BLOCK // 32)
    for i in range(GIB // BLOCK):
        yield i.to_bytes(8, "little") + base[8:]


@pytest.mark.timeout(600)
def test_a_1_gib_download_does_not_pass_through_memory(api_only: Stack) -> None:
    p = plant(api_only, generated())
    assert p.size == GIB
    assert api_only.api is not None
    pid = api_only.api.pid
    with api_only.client() as client:  # warm: the route's imports and first answer
        assert client.get(f"/v1/jobs/{p.job_id}/checkpoints/{p.name}",
                          headers={"Range": "bytes=0-9"}).status_code == 206
    digest, got = hashlib.sha256(), 0
    with MemoryWatch(pid, every_s=0.05) as api_memory, api_only.client() as client, \
            client.stream("GET", f"/v1/jobs/{p.job_id}/checkpoints/{p.name}",
                          timeout=300) as r:
        assert r.status_code == 200
        sha = r.headers["x-sha256"]
        for chunk in r.iter_raw(1 << 20):
            digest.update(chunk)
            got += len(chunk)
    assert got == GIB and digest.hexdigest() == sha == p.sha256
    grew, hwm_grew = api_memory.grew, api_memory.hwm_grew
    print(f"\nAPI {api_memory}")
    assert grew < LIMIT, f"API RSS grew {grew >> 20} MiB downloading 1 GiB"
    assert hwm_grew < LIMIT, f"API VmHWM grew {hwm_grew >> 20} MiB downloading 1 GiB"


def test_one_image_of_a_big_map_file_is_read_by_range(api_only: Stack) -> None:
    """`?image=k` loaded the whole .npy into the API (np.load of get_bytes) to answer one
    image: 256 MiB here."""
    images, shape = 64, (1, 1024, 1024)  # 4 MiB per image, 256 MiB in all
    header = np.lib.format.header_data_from_array_1_0(np.zeros((0, *shape), np.float32))
    header["shape"] = (images, *shape)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)

    def chunks() -> Iterator[bytes]:
        yield head.getvalue()
        for i in range(images):
            yield np.full(shape, i, np.float32).tobytes()

    job_id = plant_feature_map(api_only, chunks(), (images, *shape)).job_id
    assert api_only.api is not None
    pid = api_only.api.pid
    url = f"/v1/jobs/{job_id}/feature-maps/0-conv2d"
    with api_only.client() as client:
        # warm the route with an image past the end (not with one image: reading one would
        # lift the high-water mark before it is taken)
        assert client.get(url, params={"image": images}).status_code == 404
        before = status_kib(pid, "VmHWM")
        r = client.get(url, params={"image": 41}, timeout=300)
    assert r.status_code == 200, r.text
    got = np.load(io.BytesIO(r.content))
    assert got.shape == (1, *shape) and float(got.min()) == float(got.max()) == 41.0
    grew = (status_kib(pid, "VmHWM") - before) * 1024
    assert grew < LIMIT, f"API VmHWM grew {grew >> 20} MiB for one 4 MiB image"


def test_a_split_of_a_big_uploaded_dataset_is_counted_without_loading_it(
        api_only: Stack, tmp_path: Path) -> None:
    """A feature-map (or invariance) job on split `val` of an uploaded dataset reads the
    archive's labels at submission: the API loaded the whole .npz (128 MiB here) each time."""
    n = 512
    path = tmp_path / "big.npz"
    np.savez(path, x=np.ones((n, 1, 256, 256), np.float32),  # 128 MiB, stored uncompressed
             y=np.arange(n, dtype=np.int64) % 10)

    def chunks() -> Iterator[bytes]:
        with path.open("rb") as f:
            while block := f.read(BLOCK):
                yield block

    upload_id = uuid.uuid4().hex
    key = upload_key("datasets", upload_id, ".npz")
    size, sha = store_of(api_only).write(key, chunks())
    with session_scope(api_only.env["CONVOY_DATABASE_URL"]) as session:
        uploads.add(session, id=upload_id, tenant="default", kind="dataset", name="big", key=key,
                    size=size, sha256=sha, meta={"input_shape": [1, 256, 256],
                                                 "num_classes": 10, "samples": n})
    assert api_only.api is not None
    pid = api_only.api.pid
    request = feature_maps_request(
        {"model": {"input_shape": [1, 256, 256], "layers": [
            {"type": "conv2d", "out_channels": 1, "kernel_size": 3}]}, "seed": 0},
        inputs={"dataset": {"id": upload_id}, "split": "val", "indices": [0, 1]})
    with api_only.client() as client:
        assert client.get("/v1/jobs").status_code == 200  # warm
        before = status_kib(pid, "VmHWM")
        r = client.post("/v1/jobs", json=request)
        assert r.status_code == 201, r.text
        bad = client.post("/v1/jobs", json={**request, "inputs": {
            **request["inputs"], "indices": [n]}})  # past the val split: counted right
    assert bad.status_code == 422 and "split 'val'" in bad.text, bad.text
    grew = (status_kib(pid, "VmHWM") - before) * 1024
    assert grew < LIMIT, f"API VmHWM grew {grew >> 20} MiB counting a 128 MiB dataset's split"
