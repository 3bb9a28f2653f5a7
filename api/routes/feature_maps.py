"""A feature-map job's results: the layer list with shapes and statistics, and each layer's
maps as .npy, a PNG per input image, or JSON for small maps. A layer named in the URL is
looked up among the job's artifact rows, never joined into a path."""

from __future__ import annotations

import io
import math
from contextlib import suppress
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response
from sqlalchemy.orm import Session

from api.deps import PrincipalDep, SessionDep, SettingsDep, StoreDep
from api.downloads import DOWNLOAD_RESPONSES, artifact_download
from api.map_rows import read_rows
from api.routes.jobs import load_job
from api.schemas import BINARY, FeatureMapList, FeatureMapValues
from convoy.artifacts import ArtifactStore, MissingArtifact
from convoy.featuremaps import is_index, png_key
from convoy.jobspec import png_mode
from convoy.render import png_bytes
from db import artifacts
from db.tables import Artifact, Job

router = APIRouter(prefix="/v1/jobs", tags=["feature-maps"])

Array = Literal["maps", "argmax"]
NPY_HEAD_BYTES = 65536 + 16  # the longest .npy header numpy writes, and its preamble


def _feature_job(session: Session, job_id: str, tenant: str) -> Job:
    job = load_job(session, job_id, tenant)
    if job.kind != "feature_maps":
        raise HTTPException(404, f"job {job_id} is a {job.kind} job: it has no feature maps")
    return job


@router.get("/{job_id}/feature-maps", response_model=FeatureMapList)
def list_feature_maps(job_id: str, session: SessionDep, principal: PrincipalDep
                      ) -> FeatureMapList:
    job = _feature_job(session, job_id, principal.tenant)
    rows = sorted(artifacts.of_kind(session, job_id=job_id, tenant=principal.tenant,
                                    kind="feature_map"),
                  key=lambda a: (a.meta or {}).get("index", 0))
    argmax = {a.name for a in artifacts.of_kind(session, job_id=job_id, tenant=principal.tenant,
                                                 kind="argmax")}
    layers = [{
        "name": a.name, "index": a.meta["index"], "type": a.meta["type"],
        "shape": a.meta["shape"], "dtype": a.meta["dtype"], "bytes": a.meta["bytes"],
        "file_bytes": a.size, "sha256": a.sha256, "unpooled_shape": a.meta["unpooled_shape"],
        "has_argmax": a.name in argmax, "stats": a.meta["stats"],
    } for a in rows if a.meta]
    result = job.result or {}
    return FeatureMapList.model_validate({
        "job_id": job.id, "state": job.state, "layers": layers,
        "images": result.get("images"), "pool": result.get("pool"),
        "bytes_stored": result.get("bytes_stored"),
        "bytes_unpooled": result.get("bytes_unpooled")})


def _find(session: Session, job_id: str, tenant: str, kind: str, layer: str
          ) -> Artifact | None:
    """The artifact row named `layer`, or for a bare index the layer with that index."""
    found = artifacts.find(session, job_id=job_id, tenant=tenant, kind=kind, name=layer[:128])
    if found is None and is_index(layer, max_digits=5):  # ASCII digits only ("¹" is no index)
        found = artifacts.find_by_prefix(session, job_id=job_id, tenant=tenant, kind=kind,
                                         prefix=f"{int(layer)}-")
    return found


def _png(session: Session, store: ArtifactStore, job: Job, main: Artifact, k: int) -> bytes:
    """Image k's grid: stored by the job (png: eager), cached by an earlier request, or
    rendered now from image k's rows alone and cached in the store (png: lazy)."""
    meta = main.meta or {}
    if len(meta["shape"]) != 4:
        raise HTTPException(404, f"layer {main.name!r} has no PNG (only [C, H, W] maps are "
                                 "drawn)")
    row = _find(session, job.id, job.tenant, "feature_map_png", f"{main.name}/{k}")
    if row is not None:
        return store.get_bytes(row.key)
    if png_mode(job.request.get("png", True)) == "off":
        raise HTTPException(404, f"layer {main.name!r} has no PNG: the job asked for none "
                                 "(png: off)")
    key = png_key(job.id, main.name, k)
    with suppress(MissingArtifact):
        return store.get_bytes(key)
    rows, _ = read_rows(store, main.key, k, k + 1)
    blob = png_bytes(rows[0])
    store.put_bytes(key, blob)  # the next request reads it back
    return blob


@router.get("/{job_id}/feature-maps/{layer:path}", response_class=Response, responses={
    200: {"model": FeatureMapValues,
          "description": "format=npy: a .npy file (streamed; `X-Sha256` is its recorded "
                         "sha256); png: the image's grid of channels; json: the values",
          "content": {"application/octet-stream": BINARY, "image/png": BINARY}},
    **DOWNLOAD_RESPONSES})
def get_feature_map(
    job_id: str,
    layer: str,
    request: Request,
    session: SessionDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    store: StoreDep,
    format: Literal["npy", "png", "json"] = "npy",  # noqa: A002 - the API's query name
    image: Annotated[int | None, Query(ge=0)] = None,
    array: Array = "maps",
) -> Response:
    """`layer` is a name from the list (`2-maxpool2d`, `3-residual/1-conv2d` inside a
    residual block) or a top-level layer's index (`2`). `array` picks the maps (default) or,
    for max pooling, the argmax positions."""
    job = _feature_job(session, job_id, principal.tenant)
    kind = "feature_map" if array == "maps" else array
    main = _find(session, job_id, principal.tenant, "feature_map", layer)
    if main is None:
        raise HTTPException(404, f"layer {layer[:64]!r} not found among job {job_id}'s "
                                 "feature maps")
    meta = main.meta
    assert meta is not None  # a feature-map row always records its shape and dtype
    count = meta["shape"][0]
    if image is not None and image >= count:
        raise HTTPException(404, f"image {image} not found: the job has {count} images "
                                 f"(0..{count - 1})")
    headers = {"X-Layer": main.name, "X-Shape": ",".join(map(str, meta["shape"])),
               "X-Dtype": meta["dtype"]}
    if format == "png":
        if array != "maps":
            raise HTTPException(422, "array: PNGs exist for the maps only")
        k = image or 0
        return Response(_png(session, store, job, main, k), media_type="image/png",
                        headers=headers)
    artifact = main if kind == "feature_map" else _find(session, job_id, principal.tenant,
                                                        kind, main.name)
    if artifact is None:
        raise HTTPException(404, f"layer {main.name!r} has no {array} (only max pooling has)")
    shape = (artifact.meta or {})["shape"]
    # the answer's own shape and dtype (argmax: int32, not the maps' float32)
    headers["X-Shape"] = ",".join(map(str, shape))
    if (artifact.meta or {}).get("dtype"):
        headers["X-Dtype"] = str((artifact.meta or {})["dtype"])
    else:  # an argmax row written before its dtype was recorded: not the maps' dtype
        headers.pop("X-Dtype", None)
    if format == "npy" and image is None:  # the whole file: streamed, Range, or 302
        return artifact_download(
            request, store, settings, artifact, headers=headers,
            filename=f"{main.name.replace('/', '_')}.npy",
            missing=f"{artifact.name} of job {job_id}: its file is missing from the artifact "
                    "store")
    values = math.prod(shape[1:]) if image is not None else math.prod(shape)
    if format == "json" and values > settings.max_json_map_values:
        raise HTTPException(413, f"{values} values are too many for JSON (limit "
                                 f"max_json_map_values={settings.max_json_map_values}); ask "
                                 "for format=npy, or one image with image=k")
    # only the rows returned are read (one ranged read), never the whole file
    first, last = (image, image + 1) if image is not None else (0, shape[0])
    data, _ = read_rows(store, artifact.key, first, last)
    headers["X-Shape"] = ",".join(map(str, data.shape))
    headers["X-Dtype"] = str(data.dtype)
    if format == "npy":
        buf = io.BytesIO()
        np.save(buf, data, allow_pickle=False)
        return Response(buf.getvalue(), media_type="application/octet-stream", headers=headers)
    import json

    body = {"name": main.name, "array": array, "image": image, "shape": list(data.shape),
            "dtype": str(data.dtype), "values": data.tolist()}
    return Response(json.dumps(body), media_type="application/json", headers=headers)
