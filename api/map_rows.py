"""Reading some rows of a stored .npy without loading the file: its header from the first
bytes, then one ranged read of exactly the rows wanted (a local file seek, or an S3 ranged
GET), so serving image k of a 1 GiB layer costs image k's bytes."""

from __future__ import annotations

import io
import math

import numpy as np

from convoy.artifacts import ArtifactStore
from convoy.npyfile import MAX_HEADER, BadArray, NpyHeader, read_header

FIRST_READ = 4096


def _read(store: ArtifactStore, key: str, start: int, end: int) -> bytes:
    return b"".join(bytes(chunk) for chunk in store.iter_range(key, start, end))


def stored_header(store: ArtifactStore, key: str) -> NpyHeader:
    """The .npy header of a stored file, checked against the file's size (BadArray when it
    is not a C-ordered .npy of that size)."""
    size = store.size(key)
    try:
        header = read_header(io.BytesIO(_read(store, key, 0, min(size, FIRST_READ))), key)
    except BadArray:
        if size <= FIRST_READ:
            raise
        header = read_header(io.BytesIO(_read(store, key, 0, min(size, MAX_HEADER + 16))), key)
    if header.fortran or not header.shape or size != header.offset + header.nbytes:
        raise BadArray(f"{key}: not a C-ordered .npy of {size} bytes")
    return header


def read_rows(store: ArtifactStore, key: str, start: int, stop: int
              ) -> tuple[np.ndarray, NpyHeader]:
    """Rows start..stop-1 (along the first axis) of the stored .npy, and its header."""
    header = stored_header(store, key)
    stop = min(stop, header.shape[0])
    start = min(start, stop)
    row = math.prod(header.shape[1:]) * header.dtype.itemsize
    data = bytearray(row * (stop - start))
    view, position = memoryview(data), 0
    for chunk in store.iter_range(key, header.offset + start * row, header.offset + stop * row):
        view[position:position + len(chunk)] = chunk
        position += len(chunk)
    if position != len(data):
        raise BadArray(f"{key}: read {position} bytes of rows {start}..{stop - 1}, expected "
                       f"{len(data)}")
    rows = np.frombuffer(data, dtype=header.dtype).reshape((stop - start, *header.shape[1:]))
    return rows, header
