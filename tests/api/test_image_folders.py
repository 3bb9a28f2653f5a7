"""Image-folder archives through the API: a 3-class PNG/JPEG archive uploads and trains to
succeeded; each hostile archive is a 422 naming the member, and the store is unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import imagefolders as af
from tests.factories import train_request
from tests.services import wait_job

TINY_CNN = {"input_shape": [3, 16, 16], "num_classes": 3, "layers": [
    {"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1}, {"type": "relu"},
    {"type": "maxpool2d", "kernel_size": 4}, {"type": "flatten"},
    {"type": "linear", "out_features": 3}]}


def upload(client, data: bytes, filename: str, **form: str):
    return client.post("/v1/datasets", files={"file": (filename, data)},
                       data={"image_size": "16", **form})


def stored_files(stack) -> list[Path]:
    root = Path(stack.home) / "artifacts"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize(("pack", "filename", "val"), [
    (af.zip_bytes, "colours.zip", 0), (af.tar_bytes, "colours.tar.gz", 3)])
def test_a_three_class_png_jpeg_archive_trains_to_succeeded(client, pack, filename, val):
    r = upload(client, pack(af.class_files(12, val=val)), filename, name="colours")
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["input_shape"] == [3, 16, 16] and ds["num_classes"] == 3
    assert ds["classes"] == ["blue", "green", "red"]
    assert ds["samples"] == 3 * (12 + val)
    assert ds["split"] == ({"train": 36, "val": 9, "all": 45} if val else None)
    job = client.post("/v1/jobs", json=train_request(
        8, model=TINY_CNN, dataset={"id": ds["id"]}, batch_size=8, lr=0.05))
    assert job.status_code == 201, job.text
    done = wait_job(client, job.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    # three solid colours: learnt
    assert done["result"]["val_accuracy"] >= 0.9


def test_image_size_and_channels_are_checked(client):
    data = af.zip_bytes(af.class_files(2))
    r = upload(client, data, "c.zip", channels="2")
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "channels"]
    for size in ("0", "2000"):
        r = client.post("/v1/datasets", files={"file": ("c.zip", data)},
                        data={"image_size": size})
        assert r.status_code == 422
        assert r.json()["detail"][0]["loc"] == ["body", "image_size"]
    r = upload(client, data, "c.zip", channels="1")
    assert r.status_code == 201, r.text
    assert r.json()["input_shape"] == [1, 16, 16]


HOSTILE = {
    "path traversal": (lambda: af.zip_bytes({**af.class_files(2), "../../etc/cron.d/x.png":
                                             b"x"}), "../../etc/cron.d/x.png"),
    "symlink": (lambda: af.symlink_zip(af.class_files(2)), "red/link.png"),
    "10,000 empty members": (lambda: af.empty_members_zip(10_000), "c0/00000.png"),
    "decompression bomb": (lambda: af.gzip_bomb(600 << 20), "red/big.png"),
    "50000x50000 PNG header": (lambda: af.zip_bytes({**af.class_files(2),
                                                     "green/huge.png": af.huge_png_header()}),
                               "green/huge.png"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archives_are_refused_naming_the_member_and_store_nothing(client, stack, case):
    build, member = HOSTILE[case]
    data = build()
    before_files = stored_files(stack)
    before = [d["id"] for d in client.get("/v1/datasets").json()]
    r = upload(client, data, "evil.zip")
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == ["body", "file"]
    assert f"archive member {member!r}" in detail["msg"], detail["msg"]
    assert [d["id"] for d in client.get("/v1/datasets").json()] == before
    assert stored_files(stack) == before_files
