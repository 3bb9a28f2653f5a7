"""Downloading a 1 GiB artifact through the API raises the API's resident memory by less
than 64 MiB: the bytes are streamed from the store in chunks, from S3 and from the local
folder alike. The artifact is generated into the store directly (with its row, through db/)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Stack
from tests.storage.conftest import plant

GIB = 1 << 30
LIMIT = 64 << 20
BLOCK = 4 << 20


def generated() -> Iterator[bytes]:
    """1 GiB of non-repeating-looking bytes (each 4 MiB block differs), cheaply."""
    base = hashlib.sha256(b"convoy").digest() * (BLOCK // 32)
    for i in range(GIB // BLOCK):
        yield i.to_bytes(8, "little") + base[8:]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@pytest.mark.timeout(600)
def test_a_1_gib_download_does_not_pass_through_memory(api_only: Stack) -> None:
    p = plant(api_only, generated())
    assert p.size == GIB
    assert api_only.api is not None
    pid = api_only.api.pid
    with api_only.client() as client:  # warm: the route's imports and first answer
        assert client.get(f"/v1/jobs/{p.job_id}/checkpoints/{p.name}",
                          headers={"Range": "bytes=0-9"}).status_code == 206
    before_rss, before_hwm = status_kib(pid, "VmRSS"), status_kib(pid, "VmHWM")
    peak = [before_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], status_kib(pid, "VmRSS"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    digest, got = hashlib.sha256(), 0
    try:
        with api_only.client() as client, client.stream(
                "GET", f"/v1/jobs/{p.job_id}/checkpoints/{p.name}", timeout=300) as r:
            assert r.status_code == 200
            sha = r.headers["x-sha256"]
            for chunk in r.iter_raw(1 << 20):
                digest.update(chunk)
                got += len(chunk)
    finally:
        done.set()
        sampler.join()
    assert got == GIB and digest.hexdigest() == sha == p.sha256
    grew = (peak[0] - before_rss) * 1024
    hwm_grew = (status_kib(pid, "VmHWM") - before_hwm) * 1024
    print(f"\nAPI RSS before {before_rss} KiB, peak during {peak[0]} KiB "
          f"(+{grew >> 20} MiB), VmHWM +{hwm_grew >> 20} MiB")
    assert grew < LIMIT, f"API RSS grew {grew >> 20} MiB downloading 1 GiB"
    assert hwm_grew < LIMIT, f"API VmHWM grew {hwm_grew >> 20} MiB downloading 1 GiB"
