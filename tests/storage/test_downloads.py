"""Downloads through the API, from the local folder and from S3 alike: streamed whole, one
Range honoured (206), a range past the end refused (416 with `Content-Range: bytes */size`),
a malformed or multi-range header answered with the whole file (never a 5xx), X-Sha256 the
recorded digest; and with presigned downloads on, a 302 whose URL a plain GET follows."""

from __future__ import annotations

import hashlib
import io
import os

import httpx
import numpy as np
import pytest

from tests.factories import npy_bytes
from tests.services import Stack
from tests.storage.conftest import make_stack, plant, plant_feature_map, s3_env

DATA = os.urandom(300_000)


@pytest.fixture(scope="module")
def planted(api_only: Stack):  # type: ignore[no-untyped-def]
    return plant(api_only, [DATA[:100_000], DATA[100_000:]])


def url(p) -> str:  # type: ignore[no-untyped-def]
    return f"/v1/jobs/{p.job_id}/checkpoints/{p.name}"


def test_whole_download_streams_with_the_recorded_digest(api_only: Stack, planted) -> None:
    with api_only.client() as client:
        r = client.get(url(planted))
    assert r.status_code == 200
    assert r.content == DATA
    assert r.headers["x-sha256"] == hashlib.sha256(DATA).hexdigest() == planted.sha256
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["content-length"] == str(len(DATA))
    listed = api_only.client().get(f"/v1/jobs/{planted.job_id}/checkpoints").json()
    assert listed[0]["sha256"] == planted.sha256 and listed[0]["size"] == len(DATA)


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-0", 0, 1),
    ("bytes=10-19", 10, 20),
    ("bytes=299990-", 299990, 300000),
    ("bytes=-7", 299993, 300000),
    ("bytes=-999999", 0, 300000),  # a suffix longer than the file: all of it
    ("bytes=299999-400000", 299999, 300000),  # a last byte past the end: cut at the end
    ("BYTES = 5 - 9", 5, 10),
])
def test_single_ranges_answer_206(api_only: Stack, planted, header: str, start: int,
                                  end: int) -> None:
    with api_only.client() as client:
        r = client.get(url(planted), headers={"Range": header})
    assert r.status_code == 206, (header, r.status_code, r.text[:200])
    assert r.content == DATA[start:end]
    assert r.headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert r.headers["content-length"] == str(end - start)


@pytest.mark.parametrize("header", ["bytes=300000-", "bytes=400000-400010", "bytes=-0"])
def test_unsatisfiable_ranges_answer_416(api_only: Stack, planted, header: str) -> None:
    with api_only.client() as client:
        r = client.get(url(planted), headers={"Range": header})
    assert r.status_code == 416, header
    assert r.headers["content-range"] == f"bytes */{len(DATA)}"
    assert "not satisfiable" in r.json()["detail"]


@pytest.mark.parametrize("header", [
    "bytes=0-1,5-6", "bytes=-", "bytes=abc", "items=0-5", "bytes=9-3", "bytes=0-1;x",
    "bytes=" + "9" * 40 + "-", "", "bytes=\u00b9-2",
])
def test_malformed_or_multi_range_gets_the_whole_file(api_only: Stack, planted,
                                                       header: str) -> None:
    with api_only.client() as client:
        r = client.get(url(planted), headers={"Range": header.encode("utf-8")})  # type: ignore[dict-item]
    assert r.status_code == 200, header
    assert r.content == DATA


def test_feature_map_npy_downloads_stream_and_range_too(api_only: Stack) -> None:
    """The .npy route shares the download code: a planted map (object + row) comes back whole
    with its listed sha256, and one image's slice by Range."""
    maps = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    blob = npy_bytes(maps)
    p = plant_feature_map(api_only, blob, maps.shape)
    job_id, size, sha = p.job_id, p.size, p.sha256
    url = f"/v1/jobs/{job_id}/feature-maps/0-conv2d"
    with api_only.client() as client:
        whole = client.get(url)
        assert whole.status_code == 200 and whole.headers["x-sha256"] == sha
        assert np.array_equal(np.load(io.BytesIO(whole.content)), maps)
        header = size - maps.nbytes
        per_image = maps[1].nbytes
        second = client.get(url, headers={"Range": f"bytes={header + per_image}-"})
        assert second.status_code == 206
        assert np.array_equal(np.frombuffer(second.content, np.float32).reshape(3, 4, 4),
                              maps[1])
        assert client.get(url, headers={"Range": f"bytes={size}-"}).status_code == 416
        # one image by ?image=k (read by range from the store): its rows, its shape
        one = client.get(url, params={"image": 1})
        assert one.status_code == 200 and one.headers["x-shape"] == "1,3,4,4"  # was 2,3,4,4
        assert np.array_equal(np.load(io.BytesIO(one.content)), maps[1:2])
        values = client.get(url, params={"image": 1, "format": "json"})
        assert values.status_code == 200 and values.json()["values"] == maps[1:2].tolist()
        assert client.get(url, params={"image": 2}).status_code == 404


def test_presigned_302_then_a_plain_get(weed, pg_url, tmp_path) -> None:  # type: ignore[no-untyped-def]
    stack = make_stack(tmp_path, pg_url, **s3_env(weed), CONVOY_S3_PRESIGNED_DOWNLOADS="true",
                       CONVOY_S3_PRESIGNED_SECONDS="60")
    try:
        stack.start_api()
        p = plant(stack, [DATA])
        with stack.client() as client:
            r = client.get(url(p), follow_redirects=False)
            assert r.status_code == 302
            assert r.headers["x-sha256"] == p.sha256
            location = r.headers["location"]
            assert location.startswith(weed.endpoint) and "X-Amz-Signature" in location
            assert "test-admin-token" not in location
        got = httpx.get(location)  # no Convoy token: the signature is the credential
        assert got.status_code == 200 and got.content == DATA
        assert hashlib.sha256(got.content).hexdigest() == p.sha256
        ranged = httpx.get(location, headers={"Range": "bytes=5-9"})
        assert ranged.status_code == 206 and ranged.content == DATA[5:10]
    finally:
        stack.stop()
