"""One attempt of a feature-map job: load the model and the inputs the API resolved into the
job's summary, capture the layers in one inference pass, then encode and store each layer
(.npy, argmax, stats, PNGs) and record the artifact rows and the result."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from convoy import inputs
from convoy.artifacts import ArtifactStore, CorruptArtifact, get_store, job_key
from convoy.featuremaps import layer_names, layer_rows
from convoy.jobspec import (
    DatasetInputs,
    FeatureMapPlan,
    FeatureMapsJobRequest,
    PlanSource,
    RandomSource,
    TrainJobSource,
    UploadedInputs,
)
from convoy.settings import Settings
from db import artifacts, jobs, uploads
from db.session import session_scope
from db.states import JobState
from db.tables import Artifact, Job, Upload
from models.build import build_model
from models.capture import capture, channels_last
from models.spec import ModelSpec
from worker.control import Progress, Stopped
from worker.data import load_split, pick_device
from worker.lease import Lease
from worker.render import channel_stats, npy_chunks, png_images

BATCH = 256


@dataclass
class Timings:
    load_s: float = 0.0
    forward_s: float = 0.0
    encode_npy_s: float = 0.0
    encode_png_s: float = 0.0
    storage_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in vars(self).items()}


def _verified_state(store: ArtifactStore, row: Artifact | Upload, what: str
                    ) -> dict[str, torch.Tensor]:
    """The tensors of a source checkpoint whose file matches its row (size, sha256) and
    parses; otherwise CorruptArtifact naming it: a damaged checkpoint is never extracted
    from, and the job fails saying which file (no silent fallback to another one)."""
    try:
        blob = store.get_verified(row.key, name=what, size=row.size, sha256=row.sha256)
    except CorruptArtifact as exc:
        raise CorruptArtifact(f"source checkpoint {exc}; not used") from None
    try:
        return load_safetensors(blob)
    except Exception as exc:  # noqa: BLE001 - any parse failure: the file is unusable
        raise CorruptArtifact(f"source checkpoint {what}: unreadable ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); not used") from exc


def load_model(settings: Settings, job: Job, spec: ModelSpec, source: PlanSource,
               device: torch.device) -> torch.nn.Module:
    store = get_store(settings)
    if isinstance(source, RandomSource):
        torch.manual_seed(source.seed)
        return channels_last(build_model(spec).eval().to(device))
    model = build_model(spec)
    with session_scope(settings.database_url) as session:
        if isinstance(source, TrainJobSource):
            what = f"{source.checkpoint} of job {source.job_id}"
            row: Artifact | Upload | None = artifacts.find(
                session, job_id=source.job_id, tenant=job.tenant, kind="checkpoint",
                name=source.checkpoint)
        else:
            what = f"upload {source.checkpoint_id}"
            row = uploads.get(session, id=source.checkpoint_id, tenant=job.tenant,
                              kind="checkpoint")
        if row is None:
            raise LookupError(f"source checkpoint {what} not found")
        state = _verified_state(store, row, what)
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked") and name not in state:
            state[name] = torch.zeros_like(tensor)
    model.load_state_dict(state, strict=True)  # copies into the float32 parameters
    return channels_last(model.eval().to(device))


def load_inputs(settings: Settings, job: Job, plan: DatasetInputs | UploadedInputs,
                input_shape: list[int]) -> np.ndarray:
    """The (N, C, H, W) float32 inputs, in the order of `indices`."""
    return load_labelled_inputs(settings, job, plan, input_shape)[0]


def load_labelled_inputs(settings: Settings, job: Job, plan: DatasetInputs | UploadedInputs,
                         input_shape: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs as load_inputs gives them, and their labels (int64) when they come from a
    dataset; None for uploaded inputs, which have none."""
    indices = np.asarray(plan.indices, dtype=np.int64)
    if isinstance(plan, DatasetInputs):
        split = load_split(plan.dataset, settings=settings, tenant=job.tenant)
        x = {"all": split.all_x, "train": split.x_train, "val": split.x_val}[plan.split]
        y = {"all": split.all_y, "train": split.y_train, "val": split.y_val}[plan.split]
        return (np.ascontiguousarray(x[indices], dtype=np.float32),
                np.asarray(y[indices], dtype=np.int64))
    with session_scope(settings.database_url) as session:
        row = uploads.get(session, id=plan.input_id, tenant=job.tenant, kind="input")
        if row is None:
            raise LookupError(f"input upload {plan.input_id} not found")
        key = row.key
    data = get_store(settings).get_bytes(key)
    if plan.format == "npy":
        x = inputs.parse_npy(data, max_pixels=settings.max_image_pixels)
    else:
        x = inputs.image_to_array(data, input_shape, max_pixels=settings.max_image_pixels)
    return np.ascontiguousarray(x[indices]), None


def extract(model: torch.nn.Module, x: np.ndarray, wanted: list[int], *,
            pool: dict[str, Any] | None, dtype: str, device: torch.device,
            batch: int = BATCH) -> dict[int, dict[str, np.ndarray]]:
    """Captured maps per layer index as numpy arrays: 'maps', and 'argmax' for max-pooling
    layers. Runs in batches so that memory stays bounded by one batch."""
    out_dtype = torch.float16 if dtype == "float16" else torch.float32
    parts: dict[int, dict[str, list[np.ndarray]]] = {i: {} for i in wanted}
    with torch.inference_mode():
        for start in range(0, len(x), batch):
            xb = channels_last(model, torch.from_numpy(x[start:start + batch]).to(device))
            for i, cap in capture(model, xb, wanted, pool).items():
                got = parts[i]
                # back to NCHW on the device, where the copy is cheapest
                maps = cap.maps.to(out_dtype).contiguous()
                got.setdefault("maps", []).append(maps.cpu().numpy())
                if cap.argmax is not None:
                    got.setdefault("argmax", []).append(
                        cap.argmax.int().contiguous().cpu().numpy())
    return {i: {k: np.concatenate(v) for k, v in got.items()} for i, got in parts.items()}


class FeatureMapsRun:
    def __init__(self, settings: Settings, job: Job, worker_id: str) -> None:
        self.settings, self.job, self.worker_id = settings, job, worker_id
        self.request = FeatureMapsJobRequest.model_validate(job.request)
        self.summary = job.summary or {}
        self.plan = FeatureMapPlan.model_validate(self.summary["feature_maps"])
        self.store = get_store(settings)
        self.timings = Timings()
        self.written: list[str] = []

    def _put(self, kind: str, name: str, key: str, data: bytes | Iterable[bytes | memoryview],
             meta: dict[str, Any] | None) -> Artifact:
        t = time.perf_counter()
        self.written.append(key)
        if isinstance(data, bytes):
            size, sha = self.store.put_bytes(key, data)
        else:  # streamed: the store computes size and sha256 on the way
            size, sha = self.store.write(key, data)
        self.timings.storage_s += time.perf_counter() - t
        return Artifact(job_id=self.job.id, tenant=self.job.tenant, kind=kind, name=name,
                        key=key, size=size, sha256=sha, meta=meta)

    def encode_layer(self, index: int, got: dict[str, np.ndarray]) -> list[Artifact]:
        row = layer_rows(self.summary)[index]
        name = layer_names(self.summary)[index]
        maps = got["maps"]
        t = time.perf_counter()
        stats = channel_stats(maps)
        # the .npy itself is streamed to the store (header, then views of the maps): its
        # time counts in storage_s
        self.timings.encode_npy_s += time.perf_counter() - t
        meta = {"index": index, "type": row["type"], "shape": list(maps.shape),
                "dtype": str(maps.dtype), "bytes": int(maps.nbytes), "stats": stats,
                "unpooled_shape": [len(maps), *row["output_shape"]]}
        base = job_key(self.job.id, "feature-maps", name)
        rows = [self._put("feature_map", name, base + ".npy", npy_chunks(maps), meta)]
        if "argmax" in got:
            rows.append(self._put("argmax", name, f"{base}.argmax.npy", npy_chunks(got["argmax"]),
                                  {"index": index, "shape": list(got["argmax"].shape)}))
        if self.request.png and maps.ndim == 4:
            pictures = png_images(maps)
            for k in range(len(maps)):
                t = time.perf_counter()
                blob = next(pictures)
                self.timings.encode_png_s += time.perf_counter() - t
                rows.append(self._put("feature_map_png", f"{name}/{k}",
                                      job_key(self.job.id, "feature-maps", "png", name,
                                              f"{k:05d}.png"),
                                      blob, {"index": index, "image": k}))
        return rows

    def encode_all(self, captured: dict[int, dict[str, np.ndarray]], wanted: list[int],
                   lease: Lease, progress: Progress) -> tuple[list[Artifact], int, int]:
        """Every layer encoded and written; the rows, the stored and the unpooled map bytes."""
        rows: list[Artifact] = []
        stored = unpooled = 0
        itemsize = 2 if self.request.dtype == "float16" else 4
        for n, i in enumerate(wanted):
            if lease.should_stop():
                raise Stopped()
            layer_rows = self.encode_layer(i, captured.pop(i))
            meta = layer_rows[0].meta or {}
            stored += meta["bytes"]
            unpooled += int(np.prod(meta["unpooled_shape"])) * itemsize
            rows += layer_rows
            progress.value = 0.5 + 0.45 * (n + 1) / len(wanted)
        return rows, stored, unpooled

    def run(self) -> None:
        req, t0 = self.request, time.perf_counter()
        device = pick_device(req.device)
        spec = ModelSpec.model_validate(self.summary["model"])
        model = load_model(self.settings, self.job, spec, self.plan.source, device)
        x = load_inputs(self.settings, self.job, self.plan.inputs, spec.input_shape)
        names = layer_names(self.summary)
        wanted = [names.index(n) for n in self.plan.layers]
        pool = req.pool.model_dump(by_alias=True) if req.pool else None
        self.timings.load_s = time.perf_counter() - t0
        progress = Progress()
        with Lease(db_url=self.settings.database_url, job_id=self.job.id,
                   worker_id=self.worker_id, every_s=self.settings.heartbeat_seconds,
                   progress=progress) as lease:
            t = time.perf_counter()
            captured = extract(model, x, wanted, pool=pool, dtype=req.dtype, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.timings.forward_s = time.perf_counter() - t
            progress.value = 0.5
            try:
                rows, stored, unpooled = self.encode_all(captured, wanted, lease, progress)
            except Stopped:
                raise  # the lease moved on: another attempt may be writing these keys now
            except BaseException:
                self.store.discard(self.written)  # no file without its row
                raise
            t = time.perf_counter()
            with session_scope(self.settings.database_url) as session:
                held = artifacts.add(session, job_id=self.job.id, worker_id=self.worker_id,
                                      artifacts=rows)
            self.timings.storage_s += time.perf_counter() - t
            if not held or lease.should_stop():
                raise Stopped()
        result = {
            "layers": self.plan.layers, "images": len(x), "dtype": req.dtype,
            "pool": pool, "device": str(device),
            # the maps' data bytes as stored, and what the same maps take unpooled
            "bytes_stored": stored, "bytes_unpooled": unpooled,
            "artifacts": len(rows), "artifact_bytes": sum(r.size for r in rows),
            "timings": self.timings.as_dict(),
            "images_per_second": round(len(x) / max(self.timings.forward_s, 1e-9), 1),
        }
        line = (f"succeeded: {len(wanted)} layers of {len(x)} images in "
                f"{time.perf_counter() - t0:.1f} s, {len(rows)} artifacts "
                f"({result['artifact_bytes']} bytes)")
        with session_scope(self.settings.database_url) as session:
            jobs.finish_job(session, job_id=self.job.id, worker_id=self.worker_id,
                            state=JobState.SUCCEEDED, result=result, log_line=line)


def run_feature_maps(settings: Settings, job: Job, worker_id: str) -> None:
    FeatureMapsRun(settings, job, worker_id).run()
