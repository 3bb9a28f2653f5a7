"""Image-folder archives for tests: good ones (PNG and JPEG, zip and tar.gz) and hostile
ones, built in memory."""

from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import zipfile
import zlib

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def image_bytes(colour: tuple[int, int, int], fmt: str, seed: int, size: tuple[int, int] = (
        20, 14), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour)[None, None] + rng.normal(0, 20, (size[1], size[0], 3)),
                     0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def class_files(per_class: int = 8, *, val: int = 0, prefix: str = "") -> dict[str, bytes]:
    """name -> bytes: COLOURS as classes, PNG and JPEG alternating, odd sizes and modes."""
    files: dict[str, bytes] = {}
    for c, (cls, colour) in enumerate(COLOURS.items()):
        for i in range(per_class + val):
            fmt = "PNG" if i % 2 else "JPEG"
            mode = "RGB" if fmt == "JPEG" else ("RGBA", "P", "RGB")[i % 3]
            data = image_bytes(colour, fmt, seed=c * 100 + i, size=(16 + i, 12 + c), mode=mode)
            ext = "png" if fmt == "PNG" else ("jpg" if i % 4 else "JPEG")
            top = f"val/{cls}" if i >= per_class else cls
            files[f"{prefix}{top}/{i:03d}.{ext}"] = data
    return files


def zip_bytes(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return out.getvalue()


def tar_bytes(files: dict[str, bytes], *, gz: bool = True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gz else "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return out.getvalue()


def with_member(files: dict[str, bytes], info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """A tar.gz of `files` plus one member described by `info` (a link, a device...)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as t:
        for name, payload in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(payload)
            t.addfile(ti, io.BytesIO(payload))
        t.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def symlink_zip(files: dict[str, bytes], name: str = "red/link.png",
                target: str = "/etc/passwd") -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
        info = zipfile.ZipInfo(name)
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(info, target)
    return out.getvalue()


def empty_members_zip(count: int) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        for i in range(count):
            z.writestr(f"c{i % 2}/{i:05d}.png", b"")
    return out.getvalue()


def gzip_bomb(unpacked: int, name: str = "red/big.png") -> bytes:
    """A tar.gz of one member of `unpacked` zero bytes, a few hundred kB on the wire: gzip
    members concatenate, so one compressed 64 MiB block of zeros is repeated."""
    info = tarfile.TarInfo(name)
    info.size = unpacked
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    block = 64 << 20
    zeros = gzip.compress(b"\0" * block, compresslevel=9)
    parts = [gzip.compress(header)] + [zeros] * (unpacked // block)
    rest = unpacked % block + (-unpacked) % 512 + 1024  # the data's padding, the end blocks
    parts.append(gzip.compress(b"\0" * rest))
    return b"".join(parts)


def zip_bomb(unpacked: int, name: str = "red/big.png") -> bytes:
    """A zip whose one deflated member is `unpacked` zero bytes."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = b"\0" * (1 << 20)
    body = b"".join(comp.compress(chunk) for _ in range(unpacked >> 20)) + comp.flush()
    crc = 0
    for _ in range(unpacked >> 20):
        crc = zlib.crc32(chunk, crc)
    raw_name = name.encode()
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(body), unpacked,
                        len(raw_name), 0) + raw_name
    central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(body),
                          unpacked, len(raw_name), 0, 0, 0, 0, 0, 0) + raw_name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central),
                      len(local) + len(body), 0)
    return local + body + central + end


def huge_png_header(width: int = 50_000, height: int = 50_000) -> bytes:
    """A PNG whose header says width x height, with one tiny (invalid) data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">L", len(data)) + kind + data + struct.pack(
            ">L", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">2L5B", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))
