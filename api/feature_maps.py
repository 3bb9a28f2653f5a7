"""Checks a feature-map request before its row is written: the model source, the inputs, the
layers and the size of what it will store. Also checks uploaded checkpoints against a spec.
Plain Python and numpy: the API never imports torch."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import HTTPException
from sqlalchemy.orm import Session

from api.submit import check_model_limits, job_flops_limit, summarize_or_422, unprocessable
from convoy import datasets
from convoy.featuremaps import UnknownLayer, layer_names, layer_rows, resolve_layers
from convoy.jobspec import (
    MAX_INPUTS,
    DatasetInputs,
    ExportJobRequest,
    FeatureMapPlan,
    FeatureMapsJobRequest,
    IndexRange,
    Indices,
    PlanSource,
    RandomSource,
    SourcedRequest,
    TrainJobSource,
    UploadedCheckpointSource,
    UploadedInputs,
)
from convoy.settings import Settings
from convoy.textsafe import BadJSON, loads_bounded
from db import artifacts, job_reads, uploads
from models.pooling import map_bytes, pooled_shape
from models.spec import ModelSpec, Residual, pair

DEFAULT_DATASET_INPUTS = 16
# safetensors dtype -> bytes per element
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}
FLOATS = ("F64", "F32", "F16", "BF16")


def not_found(field: str, message: str) -> HTTPException:
    return HTTPException(404, f"{field}: {message}")


# -- checkpoints ---------------------------------------------------------------------------

def expected_tensors(spec: ModelSpec, summary: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """The state_dict a spec's module has: name -> shape (`layers.{i}.weight` ...)."""
    out: dict[str, tuple[int, ...]] = {}
    for layer, row in zip(spec.layers, summary["layers"], strict=True):
        p = f"layers.{row['index']}."
        if isinstance(layer, Residual):
            for inner, inner_row in zip(layer.layers, row["layers"], strict=True):
                _layer_tensors(out, inner, inner_row, f"{p}layers.{inner_row['index']}.")
            shortcut = row["shortcut"]
            if shortcut["type"] == "projection":
                c_in, c_out = row["input_shape"][0], row["output_shape"][0]
                out[p + "shortcut.0.weight"] = (c_out, c_in, 1, 1)
                if shortcut["batchnorm"]:
                    _batchnorm_tensors(out, p + "shortcut.1.", c_out)
                else:
                    out[p + "shortcut.0.bias"] = (c_out,)
        else:
            _layer_tensors(out, layer, row, p)
    return out


def _batchnorm_tensors(out: dict[str, tuple[int, ...]], p: str, channels: int) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        out[p + name] = (channels,)
    out[p + "num_batches_tracked"] = ()


def _layer_tensors(out: dict[str, tuple[int, ...]], layer: Any, row: dict[str, Any],
                   p: str) -> None:
    shape_in = row["input_shape"]
    if layer.type == "conv2d":
        kh, kw = pair(layer.kernel_size)
        out[p + "weight"] = (layer.out_channels, shape_in[0] // layer.groups, kh, kw)
        if layer.bias:
            out[p + "bias"] = (layer.out_channels,)
    elif layer.type == "linear":
        out[p + "weight"] = (layer.out_features, shape_in[0])
        if layer.bias:
            out[p + "bias"] = (layer.out_features,)
    elif layer.type == "batchnorm2d":
        _batchnorm_tensors(out, p, shape_in[0])


def _count(value: Any) -> bool:
    """A JSON integer >= 0 (not a float like 16.0, not a bool, not 1e400)."""
    return type(value) is int and value >= 0


def safetensors_header(data: bytes) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file, checked as the format (and the worker's loader)
    requires: integer shapes and offsets, known dtype sizes, offsets that tile the data
    section exactly, `__metadata__` a map of strings to strings; ValueError when it is not
    one. Hostile headers (nested 50,000 deep, offsets null or text, `shape: [1e400]`) are
    ValueErrors too, never anything else."""
    if len(data) < 8:
        raise ValueError("too short to be a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > min(len(data) - 8, 100 * 1024 * 1024):
        raise ValueError("not a safetensors file (bad header length)")
    try:
        header = loads_bounded(data[8:8 + n], max_depth=None)
    except BadJSON as exc:
        raise ValueError(f"not a safetensors file (header: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a table)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(v, str) for v in metadata.values())):
        raise ValueError("not a safetensors file (__metadata__ must map strings to strings)")
    spans = []
    for name, info in header.items():
        label = f"tensor {name[:80]!r}"
        if not isinstance(info, dict):
            raise ValueError(f"{label}: an entry is {{dtype, shape, data_offsets}}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise ValueError(f"{label}: dtype must be one of {sorted(DTYPE_BYTES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(map(_count, shape)):
            raise ValueError(f"{label}: shape must be a list of at most 8 integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
                and offsets[0] <= offsets[1]):
            raise ValueError(f"{label}: data_offsets must be two integers [begin, end] "
                             "with 0 <= begin <= end")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ValueError(f"{label}: its bytes do not match its shape")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ValueError("not a safetensors file (tensor data overlaps or has holes)")
        position = end
    if position != len(data) - 8 - n:
        raise ValueError("not a safetensors file (data section has the wrong length)")
    return header


def check_checkpoint(data: bytes, spec: ModelSpec, summary: dict[str, Any]) -> int:
    """The number of tensors, or a 422 naming the file or the first mismatching tensor."""
    try:
        header = safetensors_header(data)
    except ValueError as exc:
        raise unprocessable("file", str(exc)) from None
    wanted = expected_tensors(spec, summary)
    for name, info in sorted(header.items()):
        if name not in wanted:
            raise unprocessable("file", f"tensor {name[:80]!r} is not in the model; expected "
                                        f"{sorted(wanted)[:12]}")
        shape = tuple(info["shape"])
        if shape != wanted[name]:
            raise unprocessable("file", f"tensor {name!r} has shape {list(shape)} but the spec "
                                        f"needs {list(wanted[name])}")
        floating = not name.endswith("num_batches_tracked")
        if floating and info["dtype"] not in FLOATS:
            raise unprocessable("file", f"tensor {name!r} has dtype {info['dtype']}; "
                                        f"expected a float")
    # torch fills a missing BatchNorm counter itself; every other tensor must be there
    missing = [n for n in wanted if n not in header and not n.endswith("num_batches_tracked")]
    if missing:
        raise unprocessable("file", f"tensor {missing[0]!r} is missing "
                                    f"({len(missing)} missing in all)")
    return len(header)


# -- the model source ----------------------------------------------------------------------

def resolve_source(session: Session, req: SourcedRequest | ExportJobRequest, *, tenant: str
                   ) -> tuple[ModelSpec, PlanSource]:
    src = req.source
    given = [f for f in ("job_id", "checkpoint_id", "model") if getattr(src, f) is not None]
    if len(given) != 1:
        raise unprocessable("source", "give exactly one of job_id (a train job), checkpoint_id "
                                      "(an uploaded checkpoint) or model (random weights from "
                                      f"seed); got {given or 'none'}")
    if src.checkpoint is not None and src.job_id is None:
        raise unprocessable("source.checkpoint", "a checkpoint name needs a job_id")
    if src.job_id is not None:
        try:
            job = job_reads.get_job(session, job_id=src.job_id, tenant=tenant, kind="train")
        except job_reads.JobNotFound:
            raise not_found("source.job_id", f"no train job {src.job_id}") from None
        rows = artifacts.checkpoint_names(session, job_id=job.id, tenant=tenant)
        if src.checkpoint is not None and src.checkpoint not in rows:
            raise unprocessable("source.checkpoint", f"job {job.id} has no checkpoint "
                                                     f"{src.checkpoint!r}; it has {rows[-5:]}")
        if not rows:
            raise unprocessable("source.job_id", f"job {job.id} ({job.state}) has no "
                                                 "checkpoint yet")
        spec = ModelSpec.model_validate(job.request["model"])
        return spec, TrainJobSource(job_id=job.id, checkpoint=src.checkpoint or rows[-1])
    if src.checkpoint_id is not None:
        upload = uploads.get(session, id=src.checkpoint_id, tenant=tenant, kind="checkpoint")
        if upload is None:
            raise not_found("source.checkpoint_id", f"no checkpoint {src.checkpoint_id}")
        spec = ModelSpec.model_validate(upload.meta["model"])
        return spec, UploadedCheckpointSource(checkpoint_id=upload.id)
    assert src.model is not None
    return src.model, RandomSource(seed=src.seed)


# -- the inputs ------------------------------------------------------------------------------

def dataset_ref(raw: Any) -> datasets.DigitsRef | datasets.SyntheticRef | datasets.UploadRef:
    if isinstance(raw, str):
        return datasets.DigitsRef(name="digits") if raw == "digits" \
            else datasets.SyntheticRef(name="synthetic")
    return raw


class StoreFile(io.RawIOBase):
    """A read-only, seekable file over a stored object of known size: each read is one
    ranged read of the store (for zipfile/np.load, which seek to the parts they need)."""

    def __init__(self, store: Any, key: str, size: int) -> None:
        super().__init__()
        self.store, self.key, self.size, self.pos = store, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self.size - self.pos)
        if n <= 0:
            return 0
        got = 0
        for chunk in self.store.iter_range(self.key, self.pos, self.pos + n):
            part = memoryview(chunk).cast("B")
            view[got:got + len(part)] = part
            got += len(part)
        self.pos += got
        return got


def split_size(session: Session, ref: Any, split: str, *, tenant: str, store: Any,
               max_bytes: int | None = None) -> tuple[tuple[int, ...], int]:
    """The dataset's input shape and the number of samples in the split."""
    if isinstance(ref, datasets.DigitsRef):
        return (1, 8, 8), datasets.DIGITS_SPLIT_SIZES[split]
    if isinstance(ref, datasets.SyntheticRef):
        if too_large := datasets.oversized(ref, max_bytes):
            raise unprocessable("inputs.dataset.samples", too_large)
        # split sizes depend only on the class counts, not on the drawn images
        y = np.arange(ref.samples, dtype=np.int64) % ref.num_classes
        return (ref.channels, ref.size, ref.size), datasets.split_sizes(y, uploaded=False)[split]
    upload = uploads.get(session, id=ref.id, tenant=tenant, kind="dataset")
    if upload is None:
        raise not_found("inputs.dataset.id", f"no dataset {ref.id}")
    shape = tuple(upload.meta["input_shape"])
    if split == "all":
        return shape, int(upload.meta["samples"])
    if upload.meta.get("split"):  # an image folder with its own val/ split
        return shape, int(upload.meta["split"][split])
    # the labels only: the archive is read by range (its directory, then the y member), never
    # whole (an uploaded dataset may be hundreds of MB, and this runs at every submission)
    reader = io.BufferedReader(StoreFile(store, upload.key, upload.size), 1 << 16)
    with np.load(reader, allow_pickle=False) as archive:
        y = archive["y"]  # an .npz member loads alone: x is not read
    return shape, datasets.split_sizes(y.astype(np.int64), uploaded=True)[split]


def resolve_inputs(session: Session, req: SourcedRequest, summary: dict[str, Any], *,
                   tenant: str, store: Any, max_bytes: int | None = None,
                   default_count: int = DEFAULT_DATASET_INPUTS
                   ) -> DatasetInputs | UploadedInputs:
    inp = req.inputs
    want = tuple(summary["input_shape"])
    if (inp.dataset is None) == (inp.input_id is None):
        raise unprocessable("inputs", "give exactly one of dataset (with indices) or input_id "
                                      "(an uploaded .npy or image)")
    if inp.dataset is not None:
        ref = dataset_ref(inp.dataset)
        shape, count = split_size(session, ref, inp.split, tenant=tenant, store=store,
                                  max_bytes=max_bytes)
        what = f"split {inp.split!r} of dataset {datasets.describe(ref.model_dump())}"
        if shape != want:
            raise unprocessable("inputs.dataset", f"{what} has inputs {list(shape)} but the "
                                                  f"model takes {list(want)}")
    else:
        assert inp.input_id is not None  # exactly one of the two, checked above
        upload = uploads.get(session, id=inp.input_id, tenant=tenant, kind="input")
        if upload is None:
            raise not_found("inputs.input_id", f"no input upload {inp.input_id}")
        meta, what, input_id = upload.meta, f"upload {upload.id}", upload.id
        count = int(meta["count"])
        if meta["format"] == "npy" and tuple(meta["shape"]) != want:
            raise unprocessable("inputs.input_id", f"the uploaded arrays are {meta['shape']} "
                                                   f"per input but the model takes {list(want)}")
        if meta["format"] != "npy" and want[0] not in (1, 3):
            raise unprocessable("inputs.input_id", f"an image converts to 1 or 3 channels; "
                                                   f"the model takes {want[0]}")
    indices: Indices
    if inp.indices is None:
        indices = list(range(min(count, default_count if inp.dataset else count)))
    elif isinstance(inp.indices, list):
        indices = inp.indices
        for k, index in enumerate(indices):
            if index >= count:
                raise unprocessable(f"inputs.indices.{k}", f"index {index} is out of range: "
                                                           f"{what} has {count} samples")
    else:
        indices = IndexRange(stop=count) if inp.indices == "all" else inp.indices
        if indices.stop > count:
            raise unprocessable("inputs.indices.stop", f"stop {indices.stop} is out of range: "
                                                       f"{what} has {count} samples")
        if indices.count < 1:
            raise unprocessable("inputs.indices", f"the range {indices.start}..{indices.stop} "
                                                  "is empty: stop must be greater than start")
    n = len(indices) if isinstance(indices, list) else indices.count
    if n > MAX_INPUTS:
        raise unprocessable("inputs.indices", f"{n} inputs are too many for one job (at most "
                                              f"{MAX_INPUTS}); split it into start..stop ranges")
    if inp.dataset is not None:
        return DatasetInputs(dataset=ref, split=inp.split, indices=indices, count=n)
    return UploadedInputs(input_id=input_id, format=meta["format"], indices=indices, count=n)


# -- the request -----------------------------------------------------------------------------

@dataclass
class Resolved:
    """A request's model, its summary (each layer row named), the layers it asked for (indices,
    in model order) and its inputs: what feature-map and invariance jobs resolve alike."""

    spec: ModelSpec
    source: PlanSource
    summary: dict[str, Any]
    layers: list[int]
    inputs: DatasetInputs | UploadedInputs
    field: str  # where the model came from, for errors about it

    @property
    def layer_names(self) -> list[str]:
        names = layer_names(self.summary)
        return [names[i] for i in self.layers]


def resolve_request(session: Session, req: SourcedRequest, settings: Settings, *,
                    tenant: str, store: Any = None,
                    default_count: int = DEFAULT_DATASET_INPUTS) -> Resolved:
    """The source, the layers and the inputs of a request, or a 4xx naming the field."""
    if store is None:
        from convoy.artifacts import get_store

        store = get_store(settings)
    spec, source = resolve_source(session, req, tenant=tenant)
    field = "source.model" if isinstance(source, RandomSource) else "source"
    summary = summarize_or_422(spec, field=field)
    layers = getattr(req, "layers", None)  # an evaluate job has none: every layer runs
    if layers == []:
        raise unprocessable("layers", "give at least one layer, or null for every layer")
    try:
        wanted = resolve_layers(summary, layers)
    except UnknownLayer as exc:
        raise unprocessable(f"layers.{exc.position}", str(exc)) from None
    inputs = resolve_inputs(session, req, summary, tenant=tenant, store=store,
                            max_bytes=settings.max_dataset_bytes, default_count=default_count)
    check_model_limits(summary, settings, batch_size=min(inputs.count, 256), field=field)
    for row, name in zip(layer_rows(summary), layer_names(summary), strict=True):
        row["name"] = name
    summary["model"] = spec.model_dump(mode="json")
    return Resolved(spec, source, summary, wanted, inputs, field)


def check_feature_maps(session: Session, req: FeatureMapsJobRequest, settings: Settings, *,
                       tenant: str, store: Any = None) -> dict[str, Any]:
    """The job summary of a valid feature-map request, or a 4xx naming the field."""
    pool = req.pool.model_dump(by_alias=True) if req.pool else None
    if pool is not None and not pool["global"] and pool["kernel_size"] is None:
        raise unprocessable("pool.kernel_size", "give a kernel_size, or global: true")
    got = resolve_request(session, req, settings, tenant=tenant, store=store)
    summary, count, rows = got.summary, got.inputs.count, layer_rows(got.summary)
    stored = unpooled = 0
    for i in got.layers:
        shape = rows[i]["output_shape"]
        unpooled += map_bytes(count, shape, req.dtype)
        stored += map_bytes(count, pooled_shape(shape, pool), req.dtype)
    # the forward passes up to the last layer captured, over every input: with pooling the
    # stored bytes stay small while 100,000 inputs through a huge model would run for days
    last = max(got.layers)  # a position in forward order; its top-level layer's row counts
    top = int(layer_names(summary)[last].split("-", 1)[0])  # a whole block when inside one
    work = sum(int(row["flops"]) for row in summary["layers"][:top + 1]) * count
    limit = job_flops_limit(settings, tenant)
    if work > limit:
        raise unprocessable("inputs.indices", f"estimated work {work:.3g} FLOPs ({count} inputs "
                                              f"through layers 0..{top}) exceeds the limit "
                                              f"max_job_flops={limit:.3g} of tenant {tenant!r}; "
                                              "ask for fewer inputs or earlier layers")
    if stored > settings.max_feature_map_bytes:
        raise unprocessable("layers", f"the maps would take {stored} bytes, over the limit "
                                      f"max_feature_map_bytes={settings.max_feature_map_bytes}; "
                                      "ask for fewer layers or inputs, or add pooling")
    plan = FeatureMapPlan(source=got.source, inputs=got.inputs, layers=got.layer_names,
                          estimated_bytes=stored, estimated_bytes_unpooled=unpooled)
    summary["feature_maps"] = plan.model_dump(mode="json")
    return summary
