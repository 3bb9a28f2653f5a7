"""Streaming .npy writes: the header first (the total shape is known before the first row),
then rows appended batch by batch, straight into the artifact store's streaming write
(LocalStore: a temporary file renamed at the end; S3Store: a multipart upload). Each file is
written by its own thread from a small bounded queue, so a job writes every layer's file in
one pass over the inputs while its memory stays at a few batches per layer; the thread can
also `observe` each block of rows on the way (a layer's statistics), off the job's thread."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np

from convoy.artifacts import ArtifactStore
from convoy.render import npy_header


class Aborted(Exception):
    """Raised into a stream's write when the job gives it up: the store keeps nothing."""


_DONE = object()


class NpyStream:
    """One .npy file of `shape` written under `key` row block by row block; `close()` checks
    that exactly shape[0] rows came and returns the store's (size, sha256)."""

    def __init__(self, store: ArtifactStore, key: str, shape: tuple[int, ...],
                 dtype: np.dtype | str, depth: int = 4,
                 observe: Callable[[np.ndarray], None] | None = None) -> None:
        self.store, self.key, self.observe = store, key, observe
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.row_shape = self.shape[1:]
        self.rows = 0
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._result: tuple[int, str] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"npy {key[-60:]}", daemon=True)
        self._queue.put(npy_header(self.shape, self.dtype))
        self._thread.start()

    def _chunks(self) -> Iterator[bytes | memoryview]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, np.ndarray):
                # rows in any memory layout (e.g. a channels-last view): their C-ordered copy
                # is made here, off the thread that runs the forward
                item = np.ascontiguousarray(item)
                if self.observe is not None:  # e.g. statistics, on this thread
                    self.observe(item)
                yield item.reshape(-1).view(np.uint8).data
            else:
                assert isinstance(item, bytes)
                yield item

    def _run(self) -> None:
        try:
            self._result = self.store.write(self.key, self._chunks())
        except BaseException as exc:  # noqa: BLE001 - handed to the job's thread
            self._error = exc

    def _put(self, item: object) -> None:
        while True:
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    raise self._error or RuntimeError(f"{self.key}: writer stopped") from None

    def append(self, rows: np.ndarray) -> None:
        """Rows in the file's dtype and row shape, appended after the previous ones, in any
        memory layout (the writer thread makes their C-ordered copy). The array is handed to
        that thread: the caller must not change it afterwards."""
        if rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
            raise ValueError(f"{self.key}: rows {rows.dtype} {list(rows.shape)} do not fit "
                             f"{self.dtype} {list(self.shape)}")
        if self.rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.key}: more than {self.shape[0]} rows")
        self.rows += len(rows)
        if rows.size:
            self._put(rows)

    def close(self) -> tuple[int, str]:
        if self.rows != self.shape[0]:
            self.abort()
            raise ValueError(f"{self.key}: {self.rows} rows written of {self.shape[0]}")
        self._put(_DONE)
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def abort(self) -> None:
        """Give the file up: the store's write fails and keeps nothing."""
        if not self._thread.is_alive():
            return
        with contextlib.suppress(BaseException):  # a writer that failed kept nothing
            self._put(Aborted(self.key))
        self._thread.join()
