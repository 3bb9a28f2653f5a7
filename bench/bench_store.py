"""Artifact store throughput: a 256 MiB checkpoint written and read through Convoy's store
(`convoy.artifacts`) beside the same transfer with the client library called directly, to
the local folder and to SeaweedFS (a real S3 server, `weed server -s3`); boto3 beside
obstore (the library choice); and the API's streamed download beside a bare static-file
server on the same file. Rounds interleave A and B; medians of MB/s.

    .venv/bin/python -m bench.bench_store [--mib 256] [--rounds 3] [--smoke]
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.common import machine, median
from convoy.artifacts import LocalStore, S3Store
from tests.s3server import ACCESS_KEY, SECRET_KEY, WeedServer
from tests.services import ROOT, Stack, api_on_sqlite, free_port, wait_http
from tests.storage.conftest import plant

CHUNK = 1 << 20


def rate(fn: Callable[[], object], size: int) -> float:
    t = time.perf_counter()
    fn()
    return size / (time.perf_counter() - t) / 1e6


def side_by_side(a: Callable[[], object], b: Callable[[], object], size: int,
                 rounds: int) -> tuple[float, float]:
    ra, rb = [], []
    for _ in range(rounds):  # ABAB
        ra.append(rate(a, size))
        rb.append(rate(b, size))
    return median(ra), median(rb)


def line(what: str, convoy: float, direct: float, label: str = "direct") -> None:
    print(f"{what:<26} convoy {convoy:8.1f} MB/s  {label} {direct:8.1f} MB/s  "
          f"ratio convoy/{label} = {convoy / direct:.2f}")


def drain_local(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(CHUNK):
            pass


def write_local(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    with tmp.open("wb") as f:
        f.write(data)
    os.replace(tmp, path)


def drain_http(client: httpx.Client, url: str) -> None:
    with client.stream("GET", url) as r:
        assert r.status_code == 200, r.status_code
        for _ in r.iter_raw(CHUNK):
            pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.mib, args.rounds = 8, 1
    size = args.mib << 20
    print(f"# {machine()}")
    print(f"# a {args.mib} MiB checkpoint, {args.rounds} rounds ABAB, median MB/s")
    data = os.urandom(size)
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    weed = WeedServer(work / "weed")
    weed.start()
    os.environ.update({k: v for k, v in weed.env().items() if k.startswith("AWS_")})
    try:
        import obstore
        from obstore.store import S3Store as ObS3Store

        # -- the local folder ------------------------------------------------------------
        local = LocalStore(work / "artifacts")
        key = "jobs/bench/checkpoints/epoch-0001.safetensors"
        raw = work / "raw.bin"
        up = side_by_side(lambda: local.put_bytes(key, data), lambda: write_local(raw, data),
                          size, args.rounds)
        line("upload   local folder", *up, label="file")
        down = side_by_side(lambda: sum(len(c) for c in local.iter_range(key)),
                            lambda: drain_local(raw), size, args.rounds)
        line("download local folder", *down, label="file")

        # -- SeaweedFS: Convoy's S3Store beside obstore and boto3 called directly ------------
        s3 = S3Store(f"s3://{weed.bucket}/bench", endpoint_url=weed.endpoint)
        direct = ObS3Store(weed.bucket, prefix="direct", endpoint=weed.endpoint,
                           client_options={"allow_http": True})
        up = side_by_side(lambda: s3.put_bytes(key, data),
                          lambda: obstore.put(direct, key, data), size, args.rounds)
        line("upload   seaweedfs", *up, label="obstore")
        down = side_by_side(lambda: sum(len(c) for c in s3.iter_range(key)),
                            lambda: sum(len(c) for c in obstore.get(direct, key).stream(CHUNK)),
                            size, args.rounds)
        line("download seaweedfs", *down, label="obstore")

        import boto3

        b3 = boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

        def boto_down() -> None:
            body = b3.get_object(Bucket=weed.bucket, Key=f"boto/{key}")["Body"]
            for _ in body.iter_chunks(CHUNK):
                pass

        ob_up, boto_up = side_by_side(
            lambda: obstore.put(direct, key, data),
            lambda: b3.upload_fileobj(io.BytesIO(data), weed.bucket, f"boto/{key}"),
            size, args.rounds)
        ob_down, boto_dn = side_by_side(
            lambda: sum(len(c) for c in obstore.get(direct, key).stream(CHUNK)), boto_down,
            size, args.rounds)
        print(f"library  obstore up {ob_up:8.1f} down {ob_down:8.1f} MB/s  "
              f"boto3 up {boto_up:8.1f} down {boto_dn:8.1f} MB/s  "
              f"ratio obstore/boto3 up = {ob_up / boto_up:.2f} down = {ob_down / boto_dn:.2f}")

        # -- the API's streamed download beside a bare static-file server ------------------
        home = work / "api-local"
        home.mkdir()
        with api_on_sqlite(home) as api:
            p = plant(api, [data[i:i + CHUNK] for i in range(0, size, CHUNK)])
            port = free_port()
            bare = subprocess.Popen(
                [sys.executable, "-m", "bench.bare_static", str(port)], cwd=ROOT,
                env={**os.environ, "BARE_STATIC_ROOT": str(home / "artifacts")},
                start_new_session=True)
            try:
                wait_http(f"http://127.0.0.1:{port}/{p.key}", proc=bare)
                with api.client() as client, httpx.Client(timeout=60) as plain:
                    got = side_by_side(
                        lambda: drain_http(client, f"/v1/jobs/{p.job_id}/checkpoints/{p.name}"),
                        lambda: drain_http(plain, f"http://127.0.0.1:{port}/{p.key}"),
                        size, args.rounds)
                print(f"api download local         API {got[0]:8.1f} MB/s  bare static "
                      f"{got[1]:8.1f} MB/s  ratio API/bare = {got[0] / got[1]:.2f}")
            finally:
                Stack.kill(bare)
        home = work / "api-s3"
        home.mkdir()
        with api_on_sqlite(home, **weed.env("bench-api")) as api:
            p = plant(api, [data[i:i + CHUNK] for i in range(0, size, CHUNK)])
            with api.client() as client:
                got = side_by_side(
                    lambda: drain_http(client, f"/v1/jobs/{p.job_id}/checkpoints/{p.name}"),
                    lambda: sum(len(c) for c in obstore.get(direct, key).stream(CHUNK)),
                    size, args.rounds)
            print(f"api download seaweedfs     API {got[0]:8.1f} MB/s  obstore direct "
                  f"{got[1]:8.1f} MB/s  ratio API/direct = {got[0] / got[1]:.2f}")
    finally:
        weed.stop()


if __name__ == "__main__":
    main()
