""".npy arrays and .npz archives from untrusted bytes, with every size known before a byte
of array data is read.

- An .npz is a zip: its entry count, each member's compression method and declared
  uncompressed size are checked first (deflate and stored only: their decompression is
  bounded per read; bzip2/lzma are not).
- Each .npy header (magic, shape, dtype) is read on its own and checked: no object or
  structured dtypes (nothing is ever unpickled), and shape x itemsize must match the member's
  declared size exactly; the caller checks the shape against its limits.
- The data is then read in chunks, never more than the header promised: a member whose
  declared size lies is cut off there, and zipfile's CRC check at the end catches the lie.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import numpy as np

CHUNK = 1 << 20
MAX_MEMBERS = 64
MAX_HEADER = 64 * 1024


class BadArray(ValueError):
    """An unusable array file; `status` is 413 when it is only too large, else 422."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes before the data: magic, version, header

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class _Counting:
    """A reader that counts what was read from it (the header's length)."""

    def __init__(self, fp: IO[bytes]) -> None:
        self.fp, self.count = fp, 0

    def read(self, n: int = -1) -> bytes:
        data = self.fp.read(n)
        self.count += len(data)
        return data


def read_header(fp: IO[bytes], what: str) -> NpyHeader:
    """The header of the .npy at `fp`'s position; `fp` is left at the first data byte."""
    counting = _Counting(fp)
    try:
        version = np.lib.format.read_magic(counting)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(
                counting, max_header_size=MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(
                counting, max_header_size=MAX_HEADER)
        else:
            raise BadArray(f"{what}: .npy format version {version} is not supported")
    except BadArray:
        raise
    except Exception as exc:  # noqa: BLE001 - bad magic, a header that is not a dict, ...
        raise BadArray(f"{what}: not a readable .npy header: {str(exc)[:200]}") from None
    if dtype.hasobject:
        raise BadArray(f"{what}: holds Python objects (pickles), which are never loaded")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise BadArray(f"{what}: structured dtypes are not supported; got {dtype}")
    if any(type(d) is not int or d < 0 for d in shape):
        raise BadArray(f"{what}: bad shape {list(shape)[:8]}")
    return NpyHeader(tuple(shape), dtype, bool(fortran), counting.count)


def check_npz_directory(data: bytes, *, what: str = "") -> None:
    """Refuses archives with too many entries before zipfile lists them all."""
    try:
        # zipfile's own end-of-directory reader (private, stable since Python 2; typeshed
        # does not list it, hence getattr)
        end = getattr(zipfile, "_EndRecData")(io.BytesIO(data))  # noqa: B009
    except Exception:  # noqa: BLE001 - left to zipfile's own error below
        return
    entries = end[getattr(zipfile, "_ECD_ENTRIES_TOTAL")] if end else 0  # noqa: B009
    if entries > MAX_MEMBERS:
        raise BadArray(f"{what + ': ' if what else ''}the archive lists {entries} entries; "
                       f"at most {MAX_MEMBERS}")


@dataclass
class NpzMember:
    info: zipfile.ZipInfo
    header: NpyHeader


class Npz:
    """An open .npz whose named members' headers and declared sizes have been checked."""

    def __init__(self, data: bytes, names: tuple[str, ...], *, max_bytes: int,
                 what: str = "") -> None:
        self.what, self.max_bytes = what, max_bytes
        check_npz_directory(data, what=what)
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise BadArray(f"{what + ': ' if what else ''}not a readable .npz (zip) archive: "
                           f"{exc}") from None
        by_name = {info.filename: info for info in self.zip.infolist()}
        missing = [n for n in names if f"{n}.npy" not in by_name]
        if missing:
            raise BadArray(f"{what + ': ' if what else ''}the .npz must hold arrays named "
                           f"{list(names)}; missing {missing}")
        self.members: dict[str, NpzMember] = {}
        for name in names:
            info = by_name[f"{name}.npy"]
            label = _label(what, name)
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise BadArray(f"{label}: compression method {info.compress_type} is not "
                               "supported (use numpy.savez or savez_compressed)")
            # Declared sizes first: nothing is decompressed for a member past the cap.
            if info.file_size > max_bytes + MAX_HEADER:
                raise BadArray(f"{label} declares {info.file_size} bytes uncompressed, over "
                               f"max_dataset_bytes={max_bytes}", status=413)
            try:
                with self.zip.open(info) as fp:
                    header = read_header(fp, label)
            except BadArray:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise BadArray(f"{label}: unreadable: {exc}") from None
            if header.nbytes > max_bytes:
                raise BadArray(f"{label} of shape {list(header.shape)} and dtype {header.dtype} "
                               f"takes {header.nbytes} bytes, over max_dataset_bytes="
                               f"{max_bytes}", status=413)
            if info.file_size != header.offset + header.nbytes:
                raise BadArray(f"{label}: the archive declares {info.file_size} bytes but the "
                               f"array header describes {header.offset + header.nbytes}")
            self.members[name] = NpzMember(info, header)

    def header(self, name: str) -> NpyHeader:
        return self.members[name].header

    def chunks(self, name: str) -> Iterator[np.ndarray]:
        """The member's values as flat arrays of at most CHUNK bytes, in file order; reads
        exactly the bytes its header promised, then lets zipfile check the CRC."""
        member = self.members[name]
        header, label = member.header, _label(self.what, name)
        itemsize = header.dtype.itemsize or 1
        step = max(itemsize, CHUNK // itemsize * itemsize)
        try:
            with self.zip.open(member.info) as fp:
                fp.read(header.offset)
                left = header.nbytes
                while left > 0:
                    block = _read_exact(fp, min(step, left), label)
                    left -= len(block)
                    yield np.frombuffer(block, dtype=header.dtype)
                if fp.read(1):  # reaches the end: zipfile compares the CRC now
                    raise BadArray(f"{label}: data continues past what its header describes")
        except BadArray:
            raise
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise BadArray(f"{label}: unreadable: {exc}") from None

    def load(self, name: str) -> np.ndarray:
        """The whole member as an array (memory: its own size, plus one chunk)."""
        header = self.header(name)
        out = np.empty(math.prod(header.shape), dtype=header.dtype)
        position = 0
        for block in self.chunks(name):
            out[position:position + len(block)] = block
            position += len(block)
        return out.reshape(header.shape, order="F" if header.fortran else "C")

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> Npz:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _label(what: str, name: str) -> str:
    return f"{what}: array {name!r}" if what else f"array {name!r}"


def _read_exact(fp: IO[bytes], n: int, label: str) -> bytes:
    parts, left = [], n
    while left > 0:
        block = fp.read(left)
        if not block:
            raise BadArray(f"{label}: the data ends early (truncated or damaged archive)")
        parts.append(block)
        left -= len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def npy_header(data: bytes, what: str = "file") -> NpyHeader:
    """The header of a whole .npy file in memory, checked against the file's length."""
    header = read_header(io.BytesIO(data), what)
    if len(data) != header.offset + header.nbytes:
        raise BadArray(f"{what}: the array header describes {header.offset + header.nbytes} "
                       f"bytes but the file has {len(data)}")
    return header
