"""Image-folder datasets: a .zip, .tar or .tar.gz whose top folders are class names holding
PNG or JPEG files (torchvision's ImageFolder layout), optionally with a `val/` or `test/`
top folder laid out the same way as the validation split. Decoded once, at upload, into the
arrays of an .npz (x float32 (N, C, H, W) in 0..1, y int64; x_val, y_val for the split).

Nothing is written to disk and nothing outside the archive is touched: members are read
into memory by name. Refused, naming the member (BadDataset, 422): absolute paths, `..`,
backslashes or control characters in names, symlinks, hard links, devices and FIFOs, more
than max_archive_members members, more than max_archive_bytes unpacked (counted while
reading, so a gzip or zip bomb stops at the cap), an image over max_image_pixels (from its
header, before its pixels are decoded), a file that is not a PNG or JPEG, and anything not
in the layout. Skipped: directories, macOS metadata (`__MACOSX/`, `._*`, `.DS_Store`).

Images follow convoy.inputs' rule: first frame, EXIF orientation applied, converted to "L"
(1 channel) or "RGB" (3), resized to image_size x image_size with bilinear filtering (the
aspect ratio is not kept), scaled to 0..1. Classes are the folder names sorted (as
ImageFolder numbers them).
"""

from __future__ import annotations

import gzip
import io
import math
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from convoy import inputs
from convoy.datasets import BadDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLIT_FOLDERS = ("val", "test")
MAX_CLASS_NAME = 128


@dataclass(frozen=True)
class Limits:
    max_members: int
    max_bytes: int  # unpacked, all members together
    max_pixels: int  # per image, from its header
    max_dataset_bytes: int  # the decoded x (and x_val) as float32


@dataclass
class ImageFolder:
    classes: list[str]
    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None

    def npz_bytes(self) -> bytes:
        arrays = {"x": self.x, "y": self.y}
        if self.x_val is not None and self.y_val is not None:
            arrays.update(x_val=self.x_val, y_val=self.y_val)
        out = io.BytesIO()
        np.savez(out, **arrays)  # type: ignore[arg-type]
        return out.getvalue()


def kind(data: bytes) -> str | None:
    """"zip", "tar" or "tar.gz" from the first bytes, or None (an .npz is a zip too: the
    caller tells them apart by its members)."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:2] == b"\x1f\x8b":
        return "tar.gz"
    if data[257:262] == b"ustar":
        return "tar"
    return None


def is_npz(data: bytes) -> bool:
    """A zip holding x.npy: an .npz dataset, not an image folder."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return "x.npy" in z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def _shown(name: str) -> str:
    return repr(name[:200])


def _refuse(name: str, reason: str) -> BadDataset:
    return BadDataset(f"archive member {_shown(name)}: {reason}")


def check_name(name: str) -> list[str] | None:
    """The member's path parts, None for one to skip (macOS metadata), or BadDataset."""
    if not name or "\x00" in name or any(not ch.isprintable() for ch in name):
        raise _refuse(name, "control characters in the name")
    if "\\" in name:
        raise _refuse(name, "backslash in the name (paths use /)")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise _refuse(name, "absolute path: members must stay inside the archive")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise _refuse(name, "'..' in the path: members must stay inside the archive")
    if parts and (parts[0] == "__MACOSX" or parts[-1] == ".DS_Store"
                  or parts[-1].startswith("._")):
        return None
    return parts


class _Budget:
    """Members and unpacked bytes so far, against the limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.members, self.bytes = limits, 0, 0

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise _refuse(name, f"more than max_archive_members={self.limits.max_members} "
                                "members")

    def left(self) -> int:
        return self.limits.max_bytes - self.bytes

    def read(self, name: str, fp: IO[bytes], declared: int) -> bytes:
        """The member's bytes, reading at most one byte past what is left of the budget."""
        if declared > self.left():
            raise _refuse(name, f"unpacks to {declared} bytes: the archive would pass "
                                f"max_archive_bytes={self.limits.max_bytes} unpacked")
        data = fp.read(self.left() + 1)
        self.bytes += len(data)
        if self.bytes > self.limits.max_bytes:
            raise _refuse(name, "the archive unpacks to more than max_archive_bytes="
                                f"{self.limits.max_bytes}")
        return data


def _zip_members(data: bytes, budget: _Budget) -> Iterator[tuple[str, bytes | None]]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BadDataset(f"not a readable zip archive: {exc}") from None
    with archive:
        infos = archive.infolist()
        if len(infos) > budget.limits.max_members:
            raise _refuse(infos[budget.limits.max_members].filename,
                          f"more than max_archive_members={budget.limits.max_members} members")
        declared = 0
        for info in infos:
            # Unix file type bits (0 when the zip did not record one: a regular file)
            kind_bits = stat.S_IFMT(info.external_attr >> 16)
            if kind_bits not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise _refuse(info.filename, "a symlink or special file, not a regular file")
            declared += info.file_size
            if declared > budget.limits.max_bytes:
                raise _refuse(info.filename, f"declares {info.file_size} bytes: the archive "
                                             "would pass max_archive_bytes="
                                             f"{budget.limits.max_bytes} unpacked")
        for info in infos:
            budget.member(info.filename)
            if info.is_dir():
                yield info.filename, None
                continue
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise _refuse(info.filename, f"compression method {info.compress_type} is not "
                                             "supported (stored or deflate)")
            try:
                with archive.open(info) as fp:
                    yield info.filename, budget.read(info.filename, fp, info.file_size)
            except BadDataset:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
                raise _refuse(info.filename, f"unreadable: {exc}") from None


# room for tar's own headers and padding in the gzip cap, beyond the members' bytes
TAR_OVERHEAD = 1 << 20


class _CappedGzip(io.RawIOBase):
    """A gzip stream that refuses to inflate past `limit` + TAR_OVERHEAD bytes."""

    def __init__(self, data: bytes, limit: int) -> None:
        self.inner = gzip.GzipFile(fileobj=io.BytesIO(data))
        self.limit, self.count = limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self.limit + TAR_OVERHEAD + 1 - self.count)
        if want <= 0:
            raise BadDataset(f"the archive unpacks to more than max_archive_bytes={self.limit}")
        block = self.inner.read(want)
        buffer[:len(block)] = block
        self.count += len(block)
        return len(block)


def _tar_members(data: bytes, budget: _Budget, gz: bool) -> Iterator[tuple[str, bytes | None]]:
    source: IO[bytes] = io.BufferedReader(_CappedGzip(data, budget.limits.max_bytes)) \
        if gz else io.BytesIO(data)
    name = ""
    try:
        with tarfile.open(fileobj=source, mode="r|") as archive:
            for member in archive:
                name = member.name
                budget.member(name)
                if member.isdir():
                    yield name, None
                    continue
                if member.issym() or member.islnk():
                    raise _refuse(name, f"a {'symlink' if member.issym() else 'hard link'} "
                                        f"(to {_shown(member.linkname)}): only regular files")
                if not member.isfile():
                    raise _refuse(name, "a device, FIFO or other special file: only regular "
                                        "files")
                fp = archive.extractfile(member)
                if fp is None:
                    raise _refuse(name, "unreadable")
                yield name, budget.read(name, fp, member.size)
    except BadDataset as exc:
        if name and "archive member" not in str(exc):
            raise _refuse(name, str(exc)) from None
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise BadDataset(f"archive member {_shown(name)}: unreadable: {exc}" if name
                         else f"not a readable tar archive: {exc}") from None


@dataclass
class _Collected:
    images: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)  # class -> files
    val: dict[str, list[tuple[str, bytes]]] = field(default_factory=dict)


def _layout(members: Iterator[tuple[str, bytes | None]]) -> _Collected:
    found: list[tuple[str, list[str], bytes]] = []
    for name, payload in members:
        parts = check_name(name)
        if parts is None or payload is None:
            continue
        found.append((name, parts, payload))
    # one folder around everything (mydata/cat/1.png ...): look inside it
    tops = {parts[0] for _, parts, _ in found}
    if len(tops) == 1 and all(len(p) >= 3 for _, p, _ in found) \
            and next(iter(tops)) not in SPLIT_FOLDERS:
        found = [(n, p[1:], d) for n, p, d in found]
    out = _Collected()
    for name, parts, payload in found:
        if len(parts) == 3 and parts[0] in SPLIT_FOLDERS:
            where, cls, file = out.val, parts[1], parts[2]
        elif len(parts) == 2:
            where, cls, file = out.images, parts[0], parts[1]
        else:
            raise _refuse(name, "not in the layout CLASS/IMAGE or val/CLASS/IMAGE (an "
                                "image-folder archive's top folders are class names)")
        if len(cls) > MAX_CLASS_NAME:
            raise _refuse(name, f"class name longer than {MAX_CLASS_NAME} characters")
        if not file.lower().endswith(IMAGE_SUFFIXES):
            raise _refuse(name, "not a .png, .jpg or .jpeg file")
        where.setdefault(cls, []).append((name, payload))
    return out


def _decode(files: list[tuple[str, bytes, int]], *, size: int, channels: int,
            max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.empty((len(files), channels, size, size), dtype=np.float32)
    y = np.empty(len(files), dtype=np.int64)
    for i, (name, payload, label) in enumerate(files):
        if not payload:
            raise _refuse(name, "empty file, not an image")
        try:
            x[i] = inputs.image_to_array(payload, (channels, size, size),
                                         max_pixels=max_pixels)[0]
        except inputs.BadInput as exc:
            raise _refuse(name, str(exc)) from None
        y[i] = label
    return x, y


def read_image_folder(data: bytes, *, image_size: int, channels: int,
                      limits: Limits) -> ImageFolder:
    """The decoded dataset, or BadDataset (422) naming the member and the reason."""
    archive_kind = kind(data)
    budget = _Budget(limits)
    if archive_kind == "zip":
        members = _zip_members(data, budget)
    elif archive_kind in ("tar", "tar.gz"):
        members = _tar_members(data, budget, gz=archive_kind == "tar.gz")
    else:
        raise BadDataset("not an .npz, .zip, .tar or .tar.gz file")
    found = _layout(members)
    classes = sorted(found.images)
    if len(classes) < 2:
        raise BadDataset(f"an image-folder archive needs at least 2 class folders; found "
                         f"{len(classes)} ({', '.join(map(repr, classes[:5]))})")
    index = {c: i for i, c in enumerate(classes)}
    for cls, files in found.val.items():
        if cls not in index:
            raise _refuse(files[0][0], f"validation class {cls!r} has no training folder")
    train = [(n, d, index[c]) for c in classes for n, d in sorted(found.images[c])]
    val = [(n, d, index[c]) for c in sorted(found.val) for n, d in sorted(found.val[c])]
    per_image = channels * image_size * image_size * 4
    total = (len(train) + len(val)) * per_image
    if total > limits.max_dataset_bytes:
        raise BadDataset(f"{len(train) + len(val)} images of {[channels, image_size, image_size]}"
                         f" take {total} bytes as float32, over max_dataset_bytes="
                         f"{limits.max_dataset_bytes}", status=413)
    x, y = _decode(train, size=image_size, channels=channels, max_pixels=limits.max_pixels)
    out = ImageFolder(classes, x, y)
    if val:
        out.x_val, out.y_val = _decode(val, size=image_size, channels=channels,
                                       max_pixels=limits.max_pixels)
    if len(train) < 2:
        raise BadDataset("need at least 2 training images")
    if math.prod(x.shape[2:]) > limits.max_pixels:
        raise BadDataset(f"image_size {image_size} is over max_image_pixels={limits.max_pixels}")
    return out
