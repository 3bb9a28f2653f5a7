"""Both artifact stores through one interface: the local folder and a real S3 server
(SeaweedFS). Streaming writes (single PUT and multipart), ranged reads, integrity checks,
presigned URLs, readiness, and errors that name the store."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from convoy.artifacts import (
    ArtifactStore,
    BadKey,
    CorruptArtifact,
    LocalStore,
    MissingArtifact,
    S3Store,
    StoreUnavailable,
)
from tests.s3server import WeedServer

SMALL = 5 << 20  # the multipart threshold used here (S3's smallest part)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ArtifactStore]:
    if request.param == "local":
        yield LocalStore(tmp_path / "artifacts")
        return
    weed: WeedServer = request.getfixturevalue("weed")
    os.environ.update({k: v for k, v in weed.env().items() if k.startswith("AWS_")})
    yield S3Store(f"s3://{weed.bucket}/unit-{tmp_path.name}", endpoint_url=weed.endpoint,
                  multipart_bytes=SMALL)


def test_write_read_roundtrip_small_and_multipart(store: ArtifactStore) -> None:
    small = os.urandom(1000)
    assert store.put_bytes("jobs/a/small.bin", small) == (1000, hashlib.sha256(small).hexdigest())
    big = os.urandom(SMALL * 2 + 12345)  # crosses the threshold: a multipart upload on S3
    parts = (big[i:i + 700_001] for i in range(0, len(big), 700_001))
    size, sha = store.write("jobs/a/big.bin", parts)
    assert (size, sha) == (len(big), hashlib.sha256(big).hexdigest())
    assert store.size("jobs/a/big.bin") == len(big)
    assert store.get_bytes("jobs/a/big.bin") == big
    assert b"".join(store.iter_range("jobs/a/big.bin", chunk=1 << 20)) == big
    # from a file object, overwriting the same key (a retry)
    assert store.write("jobs/a/small.bin", io.BytesIO(big))[0] == len(big)
    assert store.get_bytes("jobs/a/small.bin") == big
    assert store.get_verified("jobs/a/big.bin", name="big", size=size, sha256=sha) == big
    with pytest.raises(CorruptArtifact, match="sha256 mismatch"):
        store.get_verified("jobs/a/big.bin", name="big", size=size, sha256="0" * 64)
    with pytest.raises(CorruptArtifact, match="missing"):
        store.get_verified("jobs/a/none.bin", name="none", size=1, sha256="0" * 64)


def test_ranges(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 100
    store.put_bytes("jobs/r/x.bin", data)
    assert b"".join(store.iter_range("jobs/r/x.bin", 10, 20)) == data[10:20]
    assert b"".join(store.iter_range("jobs/r/x.bin", 25000)) == data[25000:]
    assert b"".join(store.iter_range("jobs/r/x.bin", 5, 5)) == b""
    got = b"".join(store.iter_range("jobs/r/x.bin", 100, 9000, chunk=1000))
    assert got == data[100:9000]

    async def collect() -> bytes:
        return b"".join([c async for c in store.aiter_range("jobs/r/x.bin", 3, 25599)])

    assert asyncio.run(collect()) == data[3:25599]


def test_exists_delete_keys_and_missing(store: ArtifactStore) -> None:
    store.put_bytes("uploads/inputs/u1.npy", b"abc")
    store.put_bytes("uploads/inputs/u2.npy", b"defg")
    assert store.exists("uploads/inputs/u1.npy")
    assert sorted(store.list_keys("uploads")) == [("uploads/inputs/u1.npy", 3),
                                            ("uploads/inputs/u2.npy", 4)]
    store.delete("uploads/inputs/u1.npy")
    store.delete("uploads/inputs/u1.npy")  # twice: nothing to do
    assert not store.exists("uploads/inputs/u1.npy")
    with pytest.raises(MissingArtifact):
        store.size("uploads/inputs/u1.npy")
    with pytest.raises(MissingArtifact):
        b"".join(store.iter_range("uploads/inputs/u1.npy"))
    assert store.discard(["uploads/inputs/u2.npy", "uploads/inputs/u9.npy"]) == []
    for key in ("../etc/passwd", "/abs", "a//b", "UPPER", "a/../b"):
        with pytest.raises(BadKey):
            store.put_bytes(key, b"x")


def test_failed_source_leaves_nothing(store: ArtifactStore) -> None:
    def broken() -> Iterator[bytes]:
        yield os.urandom(SMALL + 1)  # past the threshold: a multipart upload has begun
        raise ValueError("the source broke")

    with pytest.raises(ValueError, match="the source broke"):
        store.write("jobs/f/half.bin", broken())
    assert not store.exists("jobs/f/half.bin")
    assert list(store.list_keys("jobs/f")) == []


def test_check_and_presigned(store: ArtifactStore) -> None:
    store.check()
    assert list(store.list_keys("readyz")) == []  # the probe is deleted again
    store.put_bytes("jobs/p/x.bin", b"presigned body")
    url = store.presigned_url("jobs/p/x.bin", 60)
    if isinstance(store, LocalStore):
        assert url is None
    else:
        assert url is not None and "X-Amz-Signature" in url
        assert httpx.get(url).content == b"presigned body"


def test_s3_errors_name_the_store(weed: WeedServer) -> None:
    os.environ.update({k: v for k, v in weed.env().items() if k.startswith("AWS_")})
    cases = {
        "missing bucket": S3Store("s3://no-such-bucket-here/p", endpoint_url=weed.endpoint),
        "endpoint down": S3Store(f"s3://{weed.bucket}/p", endpoint_url="http://127.0.0.1:9",
                                 max_retries=0, connect_timeout_s=1),
    }
    for what, store in cases.items():
        for fn in (store.check, lambda s=store: s.put_bytes("jobs/x/y.bin", b"1")):
            with pytest.raises(StoreUnavailable) as info:
                fn()
            assert store.name in str(info.value), what
            assert store.name in info.value.public(), what
            assert "Traceback" not in info.value.public() and "\n" not in info.value.public()
    saved = os.environ["AWS_SECRET_ACCESS_KEY"]
    try:
        os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"
        bad = S3Store(f"s3://{weed.bucket}/p", endpoint_url=weed.endpoint)
    finally:
        os.environ["AWS_SECRET_ACCESS_KEY"] = saved
    with pytest.raises(StoreUnavailable, match=f"s3://{weed.bucket}/p"):
        bad.check()
    with pytest.raises(StoreUnavailable, match="PermissionDenied|Unauthenticated"):
        bad.put_bytes("jobs/x/y.bin", b"1")


def test_a_failed_read_does_not_say_nothing_was_stored(weed: WeedServer) -> None:
    """A download from a store that is down answered "...; nothing was stored": true of a
    write only."""
    os.environ.update({k: v for k, v in weed.env().items() if k.startswith("AWS_")})
    down = S3Store(f"s3://{weed.bucket}/p", endpoint_url="http://127.0.0.1:9",
                   max_retries=0, connect_timeout_s=1)
    with pytest.raises(StoreUnavailable) as read:
        down.size("jobs/x/y.bin")
    assert "nothing was stored" not in read.value.public()
    assert "could not read" in read.value.public() and down.name in read.value.public()
    with pytest.raises(StoreUnavailable) as write:
        down.put_bytes("jobs/x/y.bin", b"1")
    assert "nothing was stored" in write.value.public()
