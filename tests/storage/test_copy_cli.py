"""`convoy artifacts copy --to s3://...`: a local artifact root copied into a bucket with the
same keys and a progress line; run again it skips identical objects and copies only what
changed; files that are no artifact key, and the local root itself, are left alone."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

from convoy.artifacts import LocalStore
from tests.s3server import WeedServer
from tests.services import ROOT


def run_copy(weed: WeedServer, root: Path, to: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVOY_")}
    env.update(weed.env(), CONVOY_ARTIFACT_ROOT=str(root), CONVOY_HOME=str(root.parent))
    return subprocess.run([sys.executable, "-m", "cli.main", "artifacts", "copy", "--to", to],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_copy_a_local_root_into_a_bucket_idempotently(weed: WeedServer, tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    local = LocalStore(root)
    files = {
        "jobs/j1/checkpoints/epoch-0001.safetensors": os.urandom(1000),
        "jobs/j1/checkpoints/epoch-0001.optimizer.safetensors": os.urandom(2000),
        "jobs/j2/maps/0-conv2d.npy": os.urandom(17 << 20),  # a multipart upload
        "uploads/datasets/u1.npz": b"",  # an empty file is an object too
    }
    for key, data in files.items():
        local.put_bytes(key, data)
    (root / "jobs" / "j1" / ".tmp-abc").write_bytes(b"half")  # a temporary file: not copied
    (root / "NOTES.txt").write_bytes(b"not an artifact key")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    prefix = f"copied-{uuid.uuid4().hex[:6]}"
    to = f"s3://{weed.bucket}/{prefix}"

    first = run_copy(weed, root, to)
    assert first.returncode == 0, first.stderr
    assert "4 copied" in first.stdout and "0 already there" in first.stdout
    assert "100.0%" in first.stderr and "4/4 files" in first.stderr  # the progress line
    c = weed.client()
    assert sorted(weed.keys(prefix=prefix + "/")) == sorted(f"{prefix}/{k}" for k in files)
    for key, data in files.items():
        body = c.get_object(Bucket=weed.bucket, Key=f"{prefix}/{key}")["Body"].read()
        assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest(), key

    second = run_copy(weed, root, to)
    assert second.returncode == 0, second.stderr
    assert "0 copied" in second.stdout and "4 already there" in second.stdout

    changed = "jobs/j1/checkpoints/epoch-0001.safetensors"
    local.put_bytes(changed, os.urandom(1000))  # same size, other bytes
    third = run_copy(weed, root, to)
    assert "1 copied" in third.stdout and "3 already there" in third.stdout, third.stdout
    body = c.get_object(Bucket=weed.bucket, Key=f"{prefix}/{changed}")["Body"].read()
    assert body == (root / changed).read_bytes()
    # the local root is left as it was (but for the one file rewritten above)
    assert {p for p in root.rglob("*")} == set(before)


def test_copy_refuses_what_it_cannot_do(weed: WeedServer, tmp_path: Path) -> None:
    (tmp_path / "artifacts").mkdir()
    assert run_copy(weed, tmp_path / "artifacts", "/some/folder").returncode == 2
    for bad in ("s3://", f"s3://{weed.bucket}/../x"):  # these printed a traceback
        refused = run_copy(weed, tmp_path / "artifacts", bad)
        assert refused.returncode == 2, refused.stderr
        assert bad in refused.stderr and "Traceback" not in refused.stderr
    missing = run_copy(weed, tmp_path / "artifacts", "s3://no-such-bucket-convoy/x")
    assert missing.returncode == 1
    assert "s3://no-such-bucket-convoy/x" in missing.stderr and "Traceback" not in missing.stderr
