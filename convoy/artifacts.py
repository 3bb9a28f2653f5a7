"""The artifact store: one small interface, a local directory behind it. Keys are built by
the server (see key helpers); a key that could escape the root is refused outright."""

from __future__ import annotations

import errno as errnos
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from contextlib import suppress
from pathlib import Path

from convoy.settings import Settings

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")


class BadKey(ValueError):
    pass


class StoreUnavailable(OSError):
    """The artifact store cannot be written (or read) right now: full, read-only, no
    permission, an I/O error. Not the job's fault: a worker retries the attempt later, an
    upload answers 507. Keeps the errno of the OSError it wraps."""

    def __init__(self, root: Path, action: str, key: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.root, self.action, self.key = root, action, key
        self.code = errnos.errorcode.get(cause.errno or 0, "unknown error")

    def __str__(self) -> str:
        return (f"artifact store {self.root}: cannot {self.action} {self.key}: "
                f"{self.code} ({self.strerror})")

    def public(self) -> str:
        """For API clients: names the store and the reason, not the server's paths."""
        return (f"the artifact store is unavailable ({self.code}: {self.strerror}); "
                "nothing was stored, try again later")


class CorruptArtifact(ValueError):
    """A stored file that does not match its row (size, sha256), is missing, or does not
    parse: never used as if it were the file that was written."""


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

    def _write(self, key: str, chunks: Iterable[bytes]) -> tuple[int, str]:
        """Write to a temporary file and rename: a reader never sees half a file. A storage
        error (full, read-only...) leaves no temporary file and raises StoreUnavailable."""
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        except OSError as exc:
            raise StoreUnavailable(self.root, "write", key, exc) from exc
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
            os.replace(tmp, target)
        except BaseException as exc:
            with suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, StoreUnavailable):
                raise StoreUnavailable(self.root, "write", key, exc) from exc
            raise
        return size, digest.hexdigest()

    def get_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def get_verified(self, key: str, *, name: str, size: int, sha256: str) -> bytes:
        """The file's bytes, checked against its row: CorruptArtifact (naming `name`) when it
        is missing, of another size or another sha256; StoreUnavailable when the store
        cannot be read (EIO...)."""
        try:
            data = self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise CorruptArtifact(f"{name}: file missing from the artifact store") from None
        except OSError as exc:
            raise StoreUnavailable(self.root, "read", key, exc) from exc
        if len(data) != size:
            raise CorruptArtifact(f"{name}: size mismatch (stored {size} bytes, read "
                                  f"{len(data)})")
        read = hashlib.sha256(data).hexdigest()
        if read != sha256:
            raise CorruptArtifact(f"{name}: sha256 mismatch (stored {sha256[:12]}..., read "
                                  f"{read[:12]}...)")
        return data

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def discard(self, keys: Iterable[str]) -> list[str]:
        """Best-effort delete (cleanup after a failed write): returns the keys that could not
        be deleted, instead of raising over the error being handled."""
        left = []
        for key in keys:
            try:
                self.delete(key)
            except OSError:
                left.append(key)
        return left


def job_key(job_id: str, *parts: str) -> str:
    return check_key("/".join(("jobs", job_id, *parts)))


def upload_key(kind: str, upload_id: str, suffix: str) -> str:
    return check_key(f"uploads/{kind}/{upload_id}{suffix}")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.safetensors"


def get_store(settings: Settings) -> LocalStore:
    """The artifact store the settings name (today: the local folder artifact_root)."""
    return LocalStore(settings.artifacts_dir)
