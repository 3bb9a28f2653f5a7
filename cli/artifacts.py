"""`convoy artifacts copy --to s3://BUCKET/PREFIX`: copy a local artifact root into a bucket
under the same keys (the rows' keys stay valid: only CONVOY_ARTIFACT_ROOT changes), with a
progress line; objects already there with the same content are skipped, so it can be run
again (after an interruption, or before switching over) and copies only what changed."""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from convoy.artifacts import KEY_RE, PROBE_PREFIX, ArtifactStore, LocalStore, MissingArtifact


@dataclass
class CopyReport:
    copied: int = 0
    skipped: int = 0
    bytes_copied: int = 0
    ignored: int = 0  # files that are no artifact key (left alone)


def expected_etag(path: Path, part_bytes: int) -> tuple[str, str]:
    """The ETag S3 gives this file uploaded in one PUT, and uploaded in parts of part_bytes."""
    whole, parts = hashlib.md5(usedforsecurity=False), []
    with path.open("rb") as f:
        while chunk := f.read(part_bytes):
            whole.update(chunk)
            parts.append(hashlib.md5(chunk, usedforsecurity=False).digest())
    multi = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return whole.hexdigest(), f"{multi}-{len(parts)}"


def same_object(src: LocalStore, dst: ArtifactStore, key: str, size: int) -> bool:
    """Whether `dst` holds this very file already (size and content, from the ETag)."""
    try:
        if dst.size(key) != size:
            return False
        etag = dst.etag(key)
    except MissingArtifact:
        return False
    if etag is None:  # a store without ETags: compare the bytes' digests
        return (hashlib.sha256(dst.get_bytes(key)).digest()
                == hashlib.sha256(src.path(key).read_bytes()).digest())
    part = getattr(dst, "multipart_bytes", 8 << 20)
    return etag in expected_etag(src.path(key), part)


def copy_root(src: LocalStore, dst: ArtifactStore, *, out: TextIO = sys.stderr) -> CopyReport:
    items = [(k, n) for k, n in src.list_keys()
             if KEY_RE.fullmatch(k) and not k.startswith(PROBE_PREFIX + "/")]
    report = CopyReport(ignored=sum(1 for _ in src.list_keys()) - len(items))
    total = sum(n for _, n in items) or 1
    done, last = 0, 0.0
    for i, (key, size) in enumerate(items, 1):
        if same_object(src, dst, key, size):
            report.skipped += 1
        else:
            written, _ = dst.write(key, src.iter_range(key))
            if written != size:
                raise RuntimeError(f"{key}: {written} bytes copied, the file has {size}")
            report.copied += 1
            report.bytes_copied += size
        done += size
        now = time.monotonic()
        if now - last > 0.2 or i == len(items):
            last = now
            width = 30
            filled = int(width * done / total)
            out.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * done / total:5.1f}% "
                      f"{i}/{len(items)} files, {done / 1e6:.1f}/{total / 1e6:.1f} MB")
            out.flush()
    out.write("\n")
    return report
