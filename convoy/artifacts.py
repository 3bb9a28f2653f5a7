"""The artifact store: one small interface, a local directory behind it. Keys are built by
the server (see key helpers); a key that could escape the root is refused outright."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")


class BadKey(ValueError):
    pass


def check_key(key: str) -> str:
    if len(key) > 500 or not KEY_RE.fullmatch(key) or ".." in key:
        raise BadKey(f"not a server-built artifact key: {key!r}")
    return key


class LocalStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path(self, key: str) -> Path:
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise BadKey(key)
        return path

    def put_bytes(self, key: str, data: bytes) -> tuple[int, str]:
        return self._write(key, [data])

    def put_file(self, key: str, source: Path) -> tuple[int, str]:
        def chunks():  # type: ignore[no-untyped-def]
            with open(source, "rb") as f:
                while chunk := f.read(1 << 20):
                    yield chunk

        return self._write(key, chunks())

    def _write(self, key: str, chunks) -> tuple[int, str]:  # type: ignore[no-untyped-def]
        """Write to a temporary file and rename: a reader never sees half a file."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size, digest.hexdigest()

    def get_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)


def job_key(job_id: str, *parts: str) -> str:
    return check_key("/".join(("jobs", job_id, *parts)))


def upload_key(kind: str, upload_id: str, suffix: str) -> str:
    return check_key(f"uploads/{kind}/{upload_id}{suffix}")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.safetensors"


def get_store(root: Path) -> LocalStore:
    return LocalStore(root)
