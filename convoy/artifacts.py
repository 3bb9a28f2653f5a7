"""The artifact store: one interface, two implementations.

- `LocalStore`: a local folder (the embedded mode, and the default).
- `S3Store`: an S3-compatible bucket (`CONVOY_ARTIFACT_ROOT=s3://BUCKET/PREFIX`,
  `CONVOY_S3_ENDPOINT_URL` for a server other than AWS; credentials and region from the
  standard AWS variables). Client library: obstore (measured against boto3 in
  bench/RESULTS.md: faster uploads, no dependencies, typed, an async API for the API's
  streamed downloads).

Both stream: `write` takes an iterable of chunks or a binary file object and computes size
and sha256 on the way (on S3 a multipart upload above `multipart_bytes`: 8 MiB parts by
default, as the AWS CLI); `iter_range` / `aiter_range` read a byte range in chunks. An
object becomes visible only complete (a renamed temporary file; an S3 PUT or a completed
multipart upload). Keys are built by the
server (see the key helpers); a key that could escape the root is refused outright.
"""

from __future__ import annotations

import errno as errnos
import hashlib
import os
import re
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import timedelta
from itertools import chain
from pathlib import Path
from typing import IO, Any, cast

from convoy.settings import Settings

KEY_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*(/[a-z0-9][a-z0-9_.-]*)*$")
CHUNK = 1 << 20  # read and streamed-write granularity
# LocalStore.put_bytes hashes a buffer up to this size on the calling thread (no new thread)
INLINE_HASH_BYTES = 1 << 20
PROBE_PREFIX = "readyz"

Chunks = Iterable[bytes | bytearray | memoryview]


class BadKey(ValueError):
    pass


class MissingArtifact(FileNotFoundError):
    """No object under that key."""


class StoreUnavailable(OSError):
    """The artifact store cannot be written (or read) right now: full, read-only, no
    permission, an I/O error; for S3 an endpoint that does not answer, credentials it
    refuses, a missing bucket. Not the job's fault: a worker retries the attempt later, an
    upload answers 507. Keeps the errno of an OSError it wraps."""

    def __init__(self, store: str, action: str, key: str, cause: BaseException,
                 *, public_name: bool = False) -> None:
        errno = cause.errno if isinstance(cause, OSError) else None
        reason = (cause.strerror if isinstance(cause, OSError) and cause.strerror
                  else _short(cause))
        super().__init__(errno, reason)
        self.root, self.action, self.key = store, action, key
        self.public_name = public_name
        self.code = (errnos.errorcode.get(errno, "unknown error") if errno
                     else type(cause).__name__)

    def __str__(self) -> str:
        return (f"artifact store {self.root}: cannot {self.action} {self.key}: "
                f"{self.code} ({self.strerror})")

    def public(self) -> str:
        """For API clients: names the store and the reason, not the server's paths (a bucket
        URL is no secret and is named; a local folder is not)."""
        where = f" {self.root}" if self.public_name else ""
        # a failed read (a download) stored nothing either, but saying so misleads
        then = ("nothing was stored, try again later" if self.action in ("write", "delete")
                else f"could not {self.action} the file, try again later")
        return f"the artifact store{where} is unavailable ({self.code}: {self.strerror}); {then}"


class CorruptArtifact(ValueError):
    """A stored file that does not match its row (size, sha256), is missing, or does not
    parse: never used as if it were the file that was written."""


def _short(exc: BaseException) -> str:
    """The first line of an exception's message (obstore's carry a long debug dump)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def check_key(key: str) -> str:
    if len(key) > 500 or not KEY_RE.fullmatch(key) or ".." in key:
        raise BadKey(f"not a server-built artifact key: {key!r}")
    return key


def _file_chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


class _Digesting:
    """Wraps chunks, counting bytes and hashing them as they pass."""

    def __init__(self, chunks: Chunks) -> None:
        self.chunks, self.size, self.digest = chunks, 0, hashlib.sha256()

    def __iter__(self) -> Iterator[bytes | bytearray | memoryview]:
        for chunk in self.chunks:
            self.digest.update(chunk)
            self.size += len(chunk)
            yield chunk


class ArtifactStore(ABC):
    """What API, workers and CLI use; `name` names the store in messages."""

    name: str

    # -- the primitives each store implements ------------------------------------------

    @abstractmethod
    def write(self, key: str, source: Chunks | IO[bytes]) -> tuple[int, str]:
        """Store the chunks (or the file object's bytes) under `key`, complete or not at all:
        (size, sha256). StoreUnavailable when the store fails; the source's own errors pass
        through, and leave nothing."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size; MissingArtifact when there is none."""

    def etag(self, key: str) -> str | None:
        """The object's ETag where the store has one (S3: the MD5 of a single-part object,
        the MD5 of the parts' MD5s and `-N` for a multipart one); MissingArtifact when there
        is no object."""
        self.size(key)
        return None

    @abstractmethod
    def iter_range(self, key: str, start: int = 0, end: int | None = None,
                   chunk: int = CHUNK) -> Iterator[bytes]:
        """Bytes start..end-1 (end None: to the end) in chunks of about `chunk` bytes."""

    @abstractmethod
    def aiter_range(self, key: str, start: int = 0, end: int | None = None,
                    chunk: int = CHUNK) -> AsyncIterator[bytes]:
        """`iter_range` for the event loop (the API's streamed downloads)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object (nothing when there is none)."""

    @abstractmethod
    def list_keys(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """Every (key, size) under `prefix`, as written (temporary files excluded)."""

    @abstractmethod
    def check(self) -> None:
        """Readiness: the store is reachable and writable (a probe written and deleted);
        StoreUnavailable naming the store otherwise."""

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A short-lived URL a client can GET the object from directly (None: not supported)."""
        return None

    # -- built on them ----------------------------------------------------------------------

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> tuple[int, str]:
        view = memoryview(data).cast("B")
        return self.write(key, (view[i:i + CHUNK] for i in range(0, max(len(view), 1), CHUNK)))

    def get_bytes(self, key: str) -> bytes:
        return b"".join(self.iter_range(key))

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except MissingArtifact:
            return False
        return True

    def get_verified(self, key: str, *, name: str, size: int, sha256: str) -> bytes:
        """The file's bytes, checked against its row: CorruptArtifact (naming `name`) when it
        is missing, of another size or another sha256; StoreUnavailable when the store
        cannot be read."""
        try:
            data = self.get_bytes(key)
        except (MissingArtifact, IsADirectoryError):
            raise CorruptArtifact(f"{name}: file missing from the artifact store") from None
        if len(data) != size:
            raise CorruptArtifact(f"{name}: size mismatch (stored {size} bytes, read "
                                  f"{len(data)})")
        read = hashlib.sha256(data).hexdigest()
        if read != sha256:
            raise CorruptArtifact(f"{name}: sha256 mismatch (stored {sha256[:12]}..., read "
                                  f"{read[:12]}...)")
        return data

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


def _chunks_of(source: Chunks | IO[bytes]) -> Chunks:
    return _file_chunks(source) if hasattr(source, "read") else source  # type: ignore[arg-type]


class LocalStore(ArtifactStore):
    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.name = str(self.root)

    def path(self, key: str) -> Path:
        """The file behind a key: for this store's own use (and tests), never outside it."""
        path = (self.root / check_key(key)).resolve()
        if self.root not in path.parents:
            raise BadKey(key)
        return path

    def _unavailable(self, action: str, key: str, exc: OSError) -> StoreUnavailable:
        return StoreUnavailable(str(self.root), action, key, exc)

    def write(self, key: str, source: Chunks | IO[bytes]) -> tuple[int, str]:
        """Write to a temporary file and rename: a reader never sees half a file. A storage
        error (full, read-only...) leaves no temporary file and raises StoreUnavailable."""
        chunks = _Digesting(_chunks_of(source))
        self._write_raw(key, chunks)
        return chunks.size, chunks.digest.hexdigest()

    def _write_raw(self, key: str, chunks: Chunks) -> tuple[int, None]:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        except OSError as exc:
            raise self._unavailable("write", key, exc) from exc
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    size += len(chunk)
            os.replace(tmp, target)
        except BaseException as exc:
            with suppress(OSError):
                Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError) and not isinstance(exc, StoreUnavailable):
                raise self._unavailable("write", key, exc) from exc
            raise
        return size, None

    def size(self, key: str) -> int:
        try:
            path = self.path(key)
            if not path.is_file():
                raise MissingArtifact(key)
            return path.stat().st_size
        except MissingArtifact:
            raise
        except FileNotFoundError:
            raise MissingArtifact(key) from None
        except OSError as exc:
            raise self._unavailable("read", key, exc) from exc

    def _open(self, key: str) -> IO[bytes]:
        try:
            return self.path(key).open("rb")
        except (FileNotFoundError, IsADirectoryError):
            raise MissingArtifact(key) from None
        except OSError as exc:
            raise self._unavailable("read", key, exc) from exc

    def iter_range(self, key: str, start: int = 0, end: int | None = None,
                   chunk: int = CHUNK) -> Iterator[bytes]:
        with self._open(key) as f:
            f.seek(start)
            left = None if end is None else max(0, end - start)
            while left is None or left > 0:
                try:
                    data = f.read(chunk if left is None else min(chunk, left))
                except OSError as exc:
                    raise self._unavailable("read", key, exc) from exc
                if not data:
                    return
                if left is not None:
                    left -= len(data)
                yield data

    async def aiter_range(self, key: str, start: int = 0, end: int | None = None,
                          chunk: int = CHUNK) -> AsyncIterator[bytes]:
        import anyio

        parts = cast(Generator[bytes, None, None], self.iter_range(key, start, end, chunk))
        try:
            while True:
                data = await anyio.to_thread.run_sync(next, parts, None)
                if data is None:
                    return
                yield data
        finally:
            parts.close()

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> tuple[int, str]:
        """The buffer written as it is (no chunk copies), its sha256 computed on another
        thread meanwhile (hashlib and file writes release the GIL); a small one hashed here,
        where starting a thread cost more than the hash (2.7 ms against 0.6 ms for a 12 kB
        checkpoint on a loaded 2-core machine)."""
        view = memoryview(data).cast("B")
        if len(view) <= INLINE_HASH_BYTES:
            size, _ = self._write_raw(key, [view])
            return size, hashlib.sha256(view).hexdigest()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as pool:
            digest = pool.submit(hashlib.sha256, view)
            size, _ = self._write_raw(key, [view])
            return size, digest.result().hexdigest()

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise MissingArtifact(key) from None
        except OSError as exc:
            raise self._unavailable("read", key, exc) from exc

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list_keys(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = self.root / prefix if prefix else self.root
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith(".tmp-"):
                yield path.relative_to(self.root).as_posix(), path.stat().st_size

    def check(self) -> None:
        key = f"{PROBE_PREFIX}/probe-{uuid.uuid4().hex}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / key
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            raise self._unavailable("write", key, exc) from exc


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://BUCKET/PREFIX -> (bucket, prefix without slashes at its ends)."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"CONVOY_ARTIFACT_ROOT={url!r}: no bucket (s3://BUCKET/PREFIX)")
    return bucket, prefix.strip("/")


class S3Store(ArtifactStore):
    """An S3-compatible bucket through obstore. Every client error (endpoint down, bad
    credentials, missing bucket) becomes StoreUnavailable naming s3://bucket/prefix."""

    def __init__(self, url: str, *, endpoint_url: str = "", multipart_bytes: int = 8 << 20,
                 timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 max_retries: int = 3) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.name = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.multipart_bytes = max(5 << 20, multipart_bytes)  # S3's smallest part
        self._store = self._make(timeout_s, connect_timeout_s, max_retries)
        self._probe_store = self._make(5.0, 2.0, 0)

    def _make(self, timeout_s: float, connect_s: float, retries: int) -> Any:
        from obstore.store import S3Store as ObS3Store

        config: dict[str, Any] = {}
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            config["region"] = region
        if self.endpoint_url:
            config["endpoint"] = self.endpoint_url
        client: Any = {"timeout": timedelta(seconds=timeout_s),
                       "connect_timeout": timedelta(seconds=connect_s),
                       "allow_http": self.endpoint_url.startswith("http://")}
        retry: Any = {"max_retries": retries, "retry_timeout": timedelta(seconds=timeout_s),
                      "backoff": {"init_backoff": timedelta(milliseconds=100),
                                  "max_backoff": timedelta(seconds=2), "base": 2}}
        return ObS3Store(self.bucket, prefix=self.prefix or None, client_options=client,
                         retry_config=retry, **config)

    def _unavailable(self, action: str, key: str, exc: BaseException) -> StoreUnavailable:
        return StoreUnavailable(self.name, action, key, exc, public_name=True)

    def _call(self, action: str, key: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from obstore.exceptions import BaseError

        try:
            return fn(*args, **kwargs)
        except FileNotFoundError as exc:
            raise self._not_found(action, key, exc) from None
        except (BaseError, OSError, TimeoutError) as exc:
            raise self._unavailable(action, key, exc) from exc

    def _not_found(self, action: str, key: str, exc: FileNotFoundError) -> OSError:
        """A missing object, or (any 404 on a write, NoSuchBucket) a missing bucket."""
        if action != "read" or "NoSuchBucket" in str(exc):
            return self._unavailable(action, key, FileNotFoundError(
                errnos.ENOENT, f"no bucket {self.bucket!r} at this endpoint"))
        return MissingArtifact(key)

    def write(self, key: str, source: Chunks | IO[bytes]) -> tuple[int, str]:
        import obstore

        check_key(key)
        digesting = _Digesting(_chunks_of(source))
        chunks = iter(digesting)
        head: list[bytes | bytearray | memoryview] = []
        buffered = 0
        for chunk in chunks:  # small objects: one PUT; larger: a multipart upload
            head.append(chunk)
            buffered += len(chunk)
            if buffered >= self.multipart_bytes:
                break
        if buffered < self.multipart_bytes:
            body = b"".join(head)
            self._call("write", key, obstore.put, self._store, key, body, use_multipart=False)
        else:
            self._call("write", key, obstore.put, self._store, key, chain(head, chunks),
                       use_multipart=True, chunk_size=self.multipart_bytes, max_concurrency=10)
        return digesting.size, digesting.digest.hexdigest()

    def etag(self, key: str) -> str | None:
        import obstore

        meta = self._call("read", key, obstore.head, self._store, check_key(key))
        return str(meta["e_tag"]).strip('"') if meta.get("e_tag") else None

    def put_bytes(self, key: str, data: bytes | bytearray | memoryview) -> tuple[int, str]:
        """The buffer itself uploaded (one PUT below the multipart threshold, else a multipart
        upload), no copy made here; its sha256 computed on another thread meanwhile (hashlib
        releases the GIL), so hashing adds no time to the upload."""
        import obstore

        view = memoryview(data).cast("B")
        check_key(key)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sha256") as pool:
            digest = pool.submit(hashlib.sha256, view)
            if len(view) < self.multipart_bytes:
                self._call("write", key, obstore.put, self._store, key, view,
                           use_multipart=False)
            else:
                self._call("write", key, obstore.put, self._store, key, view,
                           use_multipart=True, chunk_size=self.multipart_bytes,
                           max_concurrency=10)
            return len(view), digest.result().hexdigest()

    def size(self, key: str) -> int:
        import obstore

        return int(self._call("read", key, obstore.head, self._store, check_key(key))["size"])

    def _options(self, start: int, end: int | None) -> dict[str, Any]:
        if start == 0 and end is None:
            return {}
        if end is None:
            return {"range": {"offset": start}}
        return {"range": (start, end)}

    def iter_range(self, key: str, start: int = 0, end: int | None = None,
                   chunk: int = CHUNK) -> Iterator[bytes]:
        import obstore

        if end is not None and end <= start:
            return
        result = self._call("read", key, obstore.get, self._store, check_key(key),
                            options=self._options(start, end))
        stream = result.stream(min_chunk_size=chunk)
        while True:
            try:
                data = self._call("read", key, next, stream, None)
            except MissingArtifact:
                raise
            if data is None:
                return
            yield memoryview(data)  # type: ignore[misc]  # a buffer: no copy

    async def aiter_range(self, key: str, start: int = 0, end: int | None = None,
                          chunk: int = CHUNK) -> AsyncIterator[bytes]:
        import obstore
        from obstore.exceptions import BaseError

        if end is not None and end <= start:
            return
        try:
            result = await obstore.get_async(self._store, check_key(key),
                                             options=self._options(start, end))  # type: ignore[arg-type]
            async for data in result.stream(min_chunk_size=chunk):
                yield memoryview(data)  # type: ignore[misc]  # a buffer: no copy
        except FileNotFoundError as exc:
            raise self._not_found("read", key, exc) from None
        except (BaseError, OSError, TimeoutError) as exc:
            raise self._unavailable("read", key, exc) from exc

    def get_bytes(self, key: str) -> bytes:
        import obstore

        result = self._call("read", key, obstore.get, self._store, check_key(key))
        return bytes(self._call("read", key, result.bytes))

    def delete(self, key: str) -> None:
        import obstore

        self._call("delete", key, obstore.delete, self._store, check_key(key))

    def list_keys(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        import obstore

        pages = self._call("list", prefix or "/", obstore.list, self._store,
                           prefix=prefix or None, chunk_size=1000)
        while True:
            page = self._call("list", prefix or "/", next, pages, None)
            if page is None:
                return
            for meta in page:
                yield meta["path"], int(meta["size"])

    def check(self) -> None:
        import obstore

        key = f"{PROBE_PREFIX}/probe-{uuid.uuid4().hex}"
        try:
            obstore.put(self._probe_store, key, b"ok", use_multipart=False)
            obstore.delete(self._probe_store, key)
        except Exception as exc:  # noqa: BLE001 - any failure: not ready, named
            raise self._unavailable("write", key, exc) from exc

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        import obstore

        return str(self._call("sign", key, obstore.sign, self._store, "GET", check_key(key),
                              timedelta(seconds=expires_s)))


def job_key(job_id: str, *parts: str) -> str:
    return check_key("/".join(("jobs", job_id, *parts)))


def upload_key(kind: str, upload_id: str, suffix: str) -> str:
    return check_key(f"uploads/{kind}/{upload_id}{suffix}")


def checkpoint_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}.safetensors"


_S3_STORES: dict[tuple[str, str, int], S3Store] = {}


def open_store(root: str, settings: Settings | None = None) -> ArtifactStore:
    """The store a root names: s3://BUCKET/PREFIX or a local folder. S3 stores are made once
    per process and root (their clients keep connections open between jobs)."""
    if root.startswith("s3://"):
        endpoint = (settings.s3_endpoint_url if settings
                    else os.environ.get("CONVOY_S3_ENDPOINT_URL", ""))
        part = settings.s3_multipart_bytes if settings else 8 << 20
        made = _S3_STORES.get((root, endpoint, part))
        if made is None:
            made = _S3_STORES[(root, endpoint, part)] = S3Store(
                root, endpoint_url=endpoint, multipart_bytes=part)
        return made
    return LocalStore(Path(root))


def get_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings name (CONVOY_ARTIFACT_ROOT)."""
    return open_store(settings.artifact_root, settings)
