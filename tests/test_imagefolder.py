"""convoy.imagefolder on its own: the layout, decoding, and every refusal naming its member,
with small limits so the caps are reached cheaply."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest

from convoy.datasets import BadDataset
from convoy.imagefolder import Limits, read_image_folder
from tests import imagefolders as af

LIMITS = Limits(max_members=1000, max_bytes=8 << 20, max_pixels=4096 * 4096,
                max_dataset_bytes=64 << 20)


def read(data: bytes, limits: Limits = LIMITS, size: int = 8, channels: int = 3):
    return read_image_folder(data, image_size=size, channels=channels, limits=limits)


def refused(data: bytes, member: str, reason: str, limits: Limits = LIMITS) -> None:
    with pytest.raises(BadDataset) as info:
        read(data, limits)
    assert info.value.status == 422
    assert f"archive member {member!r}" in str(info.value), str(info.value)
    assert reason in str(info.value)


@pytest.mark.parametrize("pack", [af.zip_bytes, af.tar_bytes,
                                  lambda f: af.tar_bytes(f, gz=False)])
def test_class_folders_become_labels_and_val_is_kept(pack):
    folder = read(pack(af.class_files(4, val=2)))
    assert folder.classes == ["blue", "green", "red"]  # sorted, as ImageFolder numbers them
    assert folder.x.shape == (12, 3, 8, 8) and folder.x.dtype == np.float32
    assert np.bincount(folder.y).tolist() == [4, 4, 4]
    assert folder.x_val is not None and folder.y_val is not None
    assert np.bincount(folder.y_val).tolist() == [2, 2, 2]
    assert folder.x.min() >= 0.0 and folder.x.max() <= 1.0
    # the colour of each class survives decoding (JPEG and PNG, RGBA and palette modes)
    mean = folder.x.mean(axis=(2, 3))
    assert (mean[folder.y == 2].argmax(1) == 0).all()  # red
    assert (mean[folder.y == 1].argmax(1) == 1).all()  # green
    assert (mean[folder.y == 0].argmax(1) == 2).all()  # blue
    grey = read(pack(af.class_files(2)), channels=1)
    assert grey.x.shape == (6, 1, 8, 8) and grey.x_val is None


def test_one_folder_around_everything_is_looked_into_and_junk_skipped():
    files = af.class_files(2, prefix="photos/")
    files["__MACOSX/photos/red/._000.JPEG"] = b"junk"
    files["photos/.DS_Store"] = b"junk"
    assert read(af.zip_bytes(files)).classes == ["blue", "green", "red"]


def test_hostile_names_links_and_devices_are_refused_naming_the_member():
    good = af.class_files(2)
    png = next(iter(good.values()))
    refused(af.zip_bytes({**good, "../evil.png": png}), "../evil.png", "'..'")
    refused(af.tar_bytes({**good, "red/../../evil.png": png}), "red/../../evil.png", "'..'")
    refused(af.tar_bytes({**good, "/etc/red/x.png": png}), "/etc/red/x.png", "absolute")
    refused(af.zip_bytes({**good, "red\\x.png": png}), "red\\x.png", "backslash")
    refused(af.symlink_zip(good), "red/link.png", "symlink")
    link = tarfile.TarInfo("red/link.png")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    refused(af.with_member(good, link), "red/link.png", "symlink")
    hard = tarfile.TarInfo("red/hard.png")
    hard.type, hard.linkname = tarfile.LNKTYPE, "red/001.png"
    refused(af.with_member(good, hard), "red/hard.png", "hard link")
    device = tarfile.TarInfo("red/dev.png")
    device.type = tarfile.CHRTYPE
    refused(af.with_member(good, device), "red/dev.png", "device")
    fifo = tarfile.TarInfo("red/fifo.png")
    fifo.type = tarfile.FIFOTYPE
    refused(af.with_member(good, fifo), "red/fifo.png", "device, FIFO")


def test_layout_and_content_errors_name_the_member():
    good = af.class_files(2)
    refused(af.zip_bytes({**good, "loose.png": b"x"}), "loose.png", "layout")
    refused(af.zip_bytes({**good, "red/notes.txt": b"x"}), "red/notes.txt", ".png, .jpg")
    refused(af.zip_bytes({**good, "red/bad.png": b"not a png"}), "red/bad.png", "decoded")
    refused(af.zip_bytes({**good, "red/empty.png": b""}), "red/empty.png", "empty")
    refused(af.zip_bytes({**good, "val/purple/0.png": next(iter(good.values()))}),
            "val/purple/0.png", "no training folder")
    refused(af.zip_bytes({**good, "red/huge.png": af.huge_png_header()}), "red/huge.png",
            "2500000000 pixels")
    with pytest.raises(BadDataset, match="at least 2 class folders"):
        read(af.zip_bytes({k: v for k, v in good.items() if k.startswith("red/")}))


def test_member_count_and_unpacked_size_caps():
    small = Limits(max_members=50, max_bytes=4 << 20, max_pixels=4096 * 4096,
                   max_dataset_bytes=64 << 20)
    refused(af.empty_members_zip(10_000), "c0/00050.png", "max_archive_members=50", small)
    many = af.tar_bytes({f"c{i % 2}/{i:05d}.png": b"" for i in range(60)})
    refused(many, "c0/00050.png", "max_archive_members=50", small)
    refused(af.gzip_bomb(64 << 20), "red/big.png", "max_archive_bytes", small)
    refused(af.zip_bomb(64 << 20), "red/big.png", "max_archive_bytes", small)


def test_exif_orientation_is_applied():
    """A PNG whose pixels are red on the left and blue on the right, tagged with EXIF
    orientation 6 (display rotated 90 degrees clockwise): decoded, red is on top."""
    import io

    from PIL import Image

    pixels = np.zeros((16, 16, 3), dtype=np.uint8)
    pixels[:, :8, 0] = 255
    pixels[:, 8:, 2] = 255
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, format="PNG", exif=exif)
    files = {**af.class_files(2), "red/rotated.png": out.getvalue()}
    folder = read(af.zip_bytes(files), size=16)
    [i] = [k for k in range(len(folder.y)) if folder.x[k, 0, :8].mean() > 0.9]
    top, bottom = folder.x[i, :, :8], folder.x[i, :, 8:]
    assert top[0].mean() > 0.9 and top[2].mean() < 0.1  # red above
    assert bottom[2].mean() > 0.9 and bottom[0].mean() < 0.1  # blue below
