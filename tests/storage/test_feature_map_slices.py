"""Serving one image of a 1 GiB layer file (JSON values, a lazily rendered PNG, a one-image
.npy) raises the API's resident memory by less than 64 MiB: only that image's rows are read,
by a ranged read computed from the .npy header, from the local folder and from S3 alike.
The layer file and its row are planted into the store directly (through db/)."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from convoy.render import npy_header, png_bytes
from tests.services import MemoryWatch, Stack
from tests.storage.conftest import plant_feature_map
from tests.storage.test_memory import LIMIT

SHAPE = (4096, 64, 32, 32)  # float32: exactly 1 GiB of data
PER_BLOCK = 1 << 20  # values per 4 MiB block
MODEL = {"input_shape": [1, 32, 32], "layers": [
    {"type": "conv2d", "out_channels": 64, "kernel_size": 3, "padding": 1}]}


def layer_file() -> Iterator[bytes]:
    """The header, then block i holding i + 0, i + 1, ... (distinct rows, cheaply made)."""
    yield npy_header(SHAPE, np.dtype(np.float32))
    base = np.arange(PER_BLOCK, dtype=np.float32)
    for i in range(int(np.prod(SHAPE)) // PER_BLOCK):
        yield (base + i).tobytes()


def expected(k: int) -> np.ndarray:
    flat = np.arange(k * 65536, (k + 1) * 65536)
    return ((flat % PER_BLOCK) + flat // PER_BLOCK).astype(np.float32).reshape(SHAPE[1:])


@pytest.mark.timeout(600)
def test_one_image_of_a_1_gib_layer_is_served_from_its_rows(api_only: Stack) -> None:
    planted = plant_feature_map(api_only, layer_file(), SHAPE, source={"model": MODEL, "seed": 0},
                                inputs={"dataset": {"name": "synthetic", "size": 32,
                                                    "channels": 1}, "indices": [0]})
    job_id = planted.job_id
    assert planted.size > 1 << 30
    url = f"/v1/jobs/{job_id}/feature-maps/0-conv2d"
    assert api_only.api is not None
    pid = api_only.api.pid
    with api_only.client() as client:  # warm: the route's imports and first answer
        assert client.get(url, params={"format": "json", "image": 0}).status_code == 200
        assert client.get(url, params={"format": "png", "image": 0}).status_code == 200
        with MemoryWatch(pid, every_s=0.02) as api_memory:
            for k in (4095, 2000, 1):
                r = client.get(url, params={"format": "json", "image": k}, timeout=120)
                assert r.status_code == 200, r.text
                assert np.array_equal(np.asarray(r.json()["values"], np.float32)[0],
                                      expected(k))
            picture = client.get(url, params={"format": "png", "image": 3000}, timeout=120)
            one = client.get(url, params={"format": "npy", "image": 7}, timeout=120)
    assert picture.status_code == 200 and picture.content == png_bytes(expected(3000))
    assert Image.open(io.BytesIO(picture.content)).size == (8 * 33 - 1, 8 * 33 - 1)
    assert np.array_equal(np.load(io.BytesIO(one.content))[0], expected(7))
    grew, hwm_grew = api_memory.grew, api_memory.hwm_grew
    print(f"\nAPI {api_memory}")
    assert grew < LIMIT, f"API RSS grew {grew >> 20} MiB serving one image of 1 GiB"
    assert hwm_grew < LIMIT, f"API VmHWM grew {hwm_grew >> 20} MiB serving one image of 1 GiB"
