"""Datasets: the built-in ones, .npz uploads (x, y) and image-folder archives (.zip, .tar,
.tar.gz of CLASS/IMAGE files, decoded at upload by convoy.imagefolder)."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.idempotency import UploadKey, upload_replay
from api.schemas import DatasetOut
from api.uploads import check_form_text, display_name, read_capped, save_upload
from convoy import datasets, imagefolder
from convoy.settings import Settings
from db import uploads
from db.tables import Upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
DEFAULT_IMAGE_SIZE = 32

BUILTINS = [
    DatasetOut(id="digits", name="digits", builtin=True, input_shape=[1, 8, 8], num_classes=10,
               samples=datasets.DIGITS_SAMPLES),
    DatasetOut(id="synthetic", name="synthetic", builtin=True, input_shape=[3, 32, 32],
               num_classes=4, samples=2048),
]


def dataset_out(u: Upload) -> DatasetOut:
    return DatasetOut(id=u.id, name=u.name, builtin=False, input_shape=u.meta["input_shape"],
                      num_classes=u.meta["num_classes"], samples=u.meta["samples"], size=u.size,
                      sha256=u.sha256, created_at=u.created_at, classes=u.meta.get("classes"),
                      split=u.meta.get("split"))


def bad_file(exc: datasets.BadDataset) -> HTTPException:
    if exc.status == 413:
        return HTTPException(413, f"file: {exc}")
    return HTTPException(422, [{"loc": ["body", "file"], "msg": str(exc),
                                "type": "value_error"}])


def decode_upload(data: bytes, settings: Settings, *, image_size: int | None,
                  channels: int | None) -> tuple[bytes, dict[str, Any]]:
    """The bytes to store and the dataset's meta: an .npz as it came, an image-folder archive
    decoded into one. BadDataset naming the member (or the array) when it is refused."""
    archive = imagefolder.kind(data)
    if archive is None or (archive == "zip" and imagefolder.is_npz(data)):
        if image_size is not None or channels is not None:
            raise datasets.BadDataset("image_size and channels apply to image-folder archives "
                                      "(.zip, .tar, .tar.gz), not to an .npz")
        found = datasets.inspect_npz(data, max_pixels=settings.max_image_pixels,
                                     max_bytes=settings.max_dataset_bytes)
        return data, {"input_shape": list(found.input_shape),
                      "num_classes": int(np.max(found.y)) + 1, "samples": len(found.y)}
    size = image_size or DEFAULT_IMAGE_SIZE
    c = channels or 3
    folder = imagefolder.read_image_folder(data, image_size=size, channels=c, limits=(
        imagefolder.Limits(max_members=settings.max_archive_members,
                           max_bytes=settings.max_archive_bytes,
                           max_pixels=settings.max_image_pixels,
                           max_dataset_bytes=settings.max_dataset_bytes)))
    meta: dict[str, Any] = {"input_shape": [c, size, size], "num_classes": len(folder.classes),
                            "samples": len(folder.y), "classes": folder.classes,
                            "source": f"image folder ({archive})"}
    if folder.y_val is not None:
        meta["samples"] += len(folder.y_val)
        meta["split"] = {"train": len(folder.y), "val": len(folder.y_val),
                         "all": meta["samples"]}
    return folder.npz_bytes(), meta


@router.post("", status_code=201, response_model=DatasetOut)
async def upload_dataset(
    file: Annotated[UploadFile, File(description=(
        ".npz with x (N, C, H, W) and y (N,), or an image-folder archive (.zip, .tar, .tar.gz:"
        " CLASS/IMAGE.png|jpg, optionally val/CLASS/IMAGE as the validation split)"))],
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    store: StoreDep,
    response: Response,
    request: Request,
    name: Annotated[str, Form(max_length=128)] = "",
    image_size: Annotated[int | None, Form(ge=1, le=4096, description=(
        "image-folder archives: every image is resized to image_size x image_size "
        f"(default {DEFAULT_IMAGE_SIZE})"))] = None,
    channels: Annotated[int | None, Form(ge=1, le=3, description=(
        "image-folder archives: 1 (greyscale) or 3 (RGB, the default)"))] = None,
) -> DatasetOut:
    check_form_text(("name", name), ("file", file.filename))
    if channels == 2:
        raise HTTPException(422, [{"loc": ["body", "channels"], "type": "value_error",
                                   "msg": "images convert to 1 (greyscale) or 3 (RGB) channels"}])
    if image_size is not None and (image_size > settings.max_input_side
                                   or image_size**2 > settings.max_image_pixels):
        raise HTTPException(422, [{"loc": ["body", "image_size"], "type": "value_error",
                                   "msg": f"{image_size} exceeds the limit max_input_side="
                                          f"{settings.max_input_side} / max_image_pixels="
                                          f"{settings.max_image_pixels}"}])
    data = await read_capped(file, settings)
    idem, again = await upload_replay(request, session, settings, tenant=principal.tenant,
                                      kind="dataset", route="POST /v1/datasets",
                                      parts=(data, name, file.filename, str(image_size),
                                             str(channels)))
    if again is not None:  # a retry with the same Idempotency-Key and body
        response.status_code = 200
        return dataset_out(again)

    def store_dataset() -> DatasetOut:
        # CPU work (unpacking, checking every value) and blocking I/O (the store, the
        # database) run on the thread pool, never on the event loop.
        try:
            stored, meta = decode_upload(data, settings, image_size=image_size,
                                         channels=channels)
        except datasets.BadDataset as exc:
            raise bad_file(exc) from None
        with UploadKey(session, idem):
            row = save_upload(
                session, store, settings=settings, tenant=principal.tenant, kind="dataset",
                name=display_name(name or file.filename), data=stored, suffix=".npz",
                meta=meta)
        response.headers["Location"] = f"/v1/datasets/{row.id}"
        return dataset_out(row)

    return await run_in_threadpool(store_dataset)


@router.get("", response_model=list[DatasetOut])
def list_datasets(session: SessionDep, principal: PrincipalDep) -> list[DatasetOut]:
    rows = uploads.newest(session, tenant=principal.tenant, kind="dataset")
    return [*BUILTINS, *(dataset_out(u) for u in rows)]


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, principal: PrincipalDep) -> DatasetOut:
    for builtin in BUILTINS:
        if builtin.id == dataset_id:
            return builtin
    row = uploads.get(session, id=dataset_id, tenant=principal.tenant, kind="dataset")
    if row is None:
        raise HTTPException(404, f"dataset {dataset_id[:64]} not found")
    return dataset_out(row)
