"""Uploads for feature-map jobs: checkpoints (safetensors + model spec) and inputs (.npy or
PNG/JPEG). Every file is checked before a byte is stored; every query filters by tenant."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.feature_maps import check_checkpoint
from api.idempotency import UploadKey, upload_replay
from api.schemas import UploadOut
from api.submit import summarize_or_422, unprocessable
from api.textguard import unencodable_detail
from api.uploads import check_form_text, display_name, read_capped, save_upload
from convoy import inputs
from convoy.textsafe import BadJSON, first_unencodable, loads_bounded
from db import uploads
from db.tables import Upload
from models.spec import ModelSpec

router = APIRouter(tags=["uploads"])


def upload_out(u: Upload) -> UploadOut:
    return UploadOut(id=u.id, kind=u.kind, name=u.name, size=u.size, sha256=u.sha256,
                     meta=u.meta, created_at=u.created_at)


def _list(session: Session, tenant: str, kind: str) -> list[UploadOut]:
    return [upload_out(u) for u in uploads.newest(session, tenant=tenant, kind=kind)]


def _get(session: Session, tenant: str, kind: str, upload_id: str) -> UploadOut:
    row = uploads.get(session, id=upload_id, tenant=tenant, kind=kind)
    if row is None:
        raise HTTPException(404, f"{kind} {upload_id[:64]} not found")
    return upload_out(row)


def parse_model(model: str) -> tuple[ModelSpec, dict[str, Any]]:
    """The checkpoint's spec from the `model` form field, or a 422 naming `model`: hostile
    JSON (nested 100,000 deep, a 5,000-digit integer, a lone surrogate) included."""
    try:
        raw = loads_bounded(model)
    except BadJSON as exc:
        raise unprocessable("model", f"not a valid model spec: {exc}") from None
    bad = first_unencodable(raw)
    if bad is not None:
        raise HTTPException(422, [unencodable_detail(["body", "model", *bad], "model")])
    try:
        spec = ModelSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise unprocessable("model", f"not a valid model spec{' at ' + where if where else ''}"
                                     f": {first['msg']}") from None
    return spec, summarize_or_422(spec)


@router.post("/v1/checkpoints", status_code=201, response_model=UploadOut)
async def upload_checkpoint(
    file: Annotated[UploadFile, File(description=".safetensors named layers.{i}.weight/bias")],
    model: Annotated[str, Form(description="the model spec as JSON")],
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    store: StoreDep,
    response: Response,
    request: Request,
    name: Annotated[str, Form(max_length=128)] = "",
) -> UploadOut:
    check_form_text(("model", model), ("name", name), ("file", file.filename))
    spec, summary = await run_in_threadpool(parse_model, model)
    data = await read_capped(file, settings)
    idem, again = await upload_replay(request, session, settings, tenant=principal.tenant,
                                      kind="checkpoint", route="POST /v1/checkpoints",
                                      parts=(data, model, name, file.filename))
    if again is not None:  # a retry with the same Idempotency-Key and body
        response.status_code = 200
        return upload_out(again)

    def store_checkpoint() -> UploadOut:
        # parsing the header (up to 100 MB of JSON) and the blocking writes: thread pool
        tensors = check_checkpoint(data, spec, summary)
        with UploadKey(session, idem):
            row = save_upload(session, store, settings=settings, tenant=principal.tenant,
                        kind="checkpoint",
                        name=display_name(name or file.filename), data=data,
                        suffix=".safetensors",
                        meta={"model": spec.model_dump(mode="json"), "tensors": tensors,
                              "total_params": summary["total_params"]})
        response.headers["Location"] = f"/v1/checkpoints/{row.id}"
        return upload_out(row)

    return await run_in_threadpool(store_checkpoint)


@router.get("/v1/checkpoints", response_model=list[UploadOut])
def list_checkpoints(session: SessionDep, principal: PrincipalDep) -> list[UploadOut]:
    return _list(session, principal.tenant, "checkpoint")


@router.get("/v1/checkpoints/{checkpoint_id}", response_model=UploadOut)
def get_checkpoint(checkpoint_id: str, session: SessionDep, principal: PrincipalDep
                   ) -> UploadOut:
    return _get(session, principal.tenant, "checkpoint", checkpoint_id)


@router.post("/v1/inputs", status_code=201, response_model=UploadOut)
async def upload_inputs(
    file: Annotated[UploadFile, File(description=".npy (N, C, H, W) float, or a PNG/JPEG")],
    session: SessionDep,
    settings: SettingsDep,
    principal: PrincipalDep,
    store: StoreDep,
    response: Response,
    request: Request,
    name: Annotated[str, Form(max_length=128)] = "",
) -> UploadOut:
    check_form_text(("name", name), ("file", file.filename))
    data = await read_capped(file, settings)
    idem, again = await upload_replay(request, session, settings, tenant=principal.tenant,
                                      kind="input", route="POST /v1/inputs",
                                      parts=(data, name, file.filename))
    if again is not None:  # a retry with the same Idempotency-Key and body
        response.status_code = 200
        return upload_out(again)

    def store_inputs() -> UploadOut:
        # decoding an image or checking every value is CPU work: thread pool
        try:
            kind = inputs.sniff(data)
            if kind == "npy":
                x = inputs.parse_npy(data, max_pixels=settings.max_image_pixels,
                                     max_bytes=settings.max_dataset_bytes)
                meta: dict[str, Any] = {"format": "npy", "count": int(x.shape[0]),
                                        "shape": list(x.shape[1:])}
            else:
                meta = inputs.image_meta(data, max_pixels=settings.max_image_pixels)
        except inputs.BadInput as exc:
            if exc.status == 413:
                raise HTTPException(413, f"file: {exc}") from None
            raise unprocessable("file", str(exc)) from None
        with UploadKey(session, idem):
            row = save_upload(session, store, settings=settings, tenant=principal.tenant,
                        kind="input",
                        name=display_name(name or file.filename), data=data,
                        suffix=".npy" if meta["format"] == "npy" else f".{meta['format']}",
                        meta=meta)
        response.headers["Location"] = f"/v1/inputs/{row.id}"
        return upload_out(row)

    return await run_in_threadpool(store_inputs)


@router.get("/v1/inputs", response_model=list[UploadOut])
def list_inputs(session: SessionDep, principal: PrincipalDep) -> list[UploadOut]:
    return _list(session, principal.tenant, "input")


@router.get("/v1/inputs/{input_id}", response_model=UploadOut)
def get_inputs(input_id: str, session: SessionDep, principal: PrincipalDep) -> UploadOut:
    return _get(session, principal.tenant, "input", input_id)
