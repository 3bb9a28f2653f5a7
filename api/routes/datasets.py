"""Datasets: the built-in ones and .npz uploads (x, y)."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.idempotency import UploadKey, upload_replay
from api.schemas import DatasetOut
from api.uploads import check_form_text, display_name, read_capped, save_upload
from convoy import datasets
from db import uploads
from db.tables import Upload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

BUILTINS = [
    DatasetOut(id="digits", name="digits", builtin=True, input_shape=[1, 8, 8], num_classes=10,
               samples=datasets.DIGITS_SAMPLES),
    DatasetOut(id="synthetic", name="synthetic", builtin=True, input_shape=[3, 32, 32],
               num_classes=4, samples=2048),
]


def dataset_out(u: Upload) -> DatasetOut:
    return DatasetOut(id=u.id, name=u.name, builtin=False, input_shape=u.meta["input_shape"],
                      num_classes=u.meta["num_classes"], samples=u.meta["samples"], size=u.size,
                      sha256=u.sha256, created_at=u.created_at)


@router.post("", status_code=201, response_model=DatasetOut)
async def upload_dataset(
    file: Annotated[UploadFile, File(description=".npz with x (N, C, H, W) and y (N,)")],
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    store: StoreDep,
    response: Response,
    request: Request,
    name: Annotated[str, Form(max_length=128)] = "",
) -> DatasetOut:
    check_form_text(("name", name), ("file", file.filename))
    data = await read_capped(file, settings)
    idem, again = await upload_replay(request, session, settings, tenant=principal.tenant,
                                      kind="dataset", route="POST /v1/datasets",
                                      parts=(data, name, file.filename))
    if again is not None:  # a retry with the same Idempotency-Key and body
        response.status_code = 200
        return dataset_out(again)

    def store_dataset() -> DatasetOut:
        # CPU work (unpacking, checking every value) and blocking I/O (the store, the
        # database) run on the thread pool, never on the event loop.
        try:
            found = datasets.inspect_npz(data, max_pixels=settings.max_image_pixels,
                                         max_bytes=settings.max_dataset_bytes)
        except datasets.BadDataset as exc:
            if exc.status == 413:
                raise HTTPException(413, f"file: {exc}") from None
            raise HTTPException(422, [{"loc": ["body", "file"], "msg": str(exc),
                                       "type": "value_error"}]) from None
        with UploadKey(session, idem):
            row = save_upload(
                session, store, settings=settings, tenant=principal.tenant, kind="dataset",
                name=display_name(name or file.filename), data=data, suffix=".npz",
                meta={"input_shape": list(found.input_shape),
                      "num_classes": int(np.max(found.y)) + 1, "samples": len(found.y)})
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
