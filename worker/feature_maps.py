"""One attempt of a feature-map job: load the model and the inputs the API resolved into the
job's summary, capture the layers in one inference pass, then encode and store each layer
(.npy, argmax, stats, PNGs) and record the artifact rows and the result."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from convoy import inputs
from convoy.artifacts import ArtifactStore, CorruptArtifact, get_store, job_key
from convoy.featuremaps import layer_names, layer_rows, png_key
from convoy.jobspec import (
    DatasetInputs,
    FeatureMapPlan,
    FeatureMapsJobRequest,
    PlanSource,
    RandomSource,
    TrainJobSource,
    UploadedCheckpointSource,
    UploadedInputs,
    index_array,
    png_mode,
)
from convoy.render import ChannelStats, png_images
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
from worker.npystream import NpyStream
from worker.train import seed_torch

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


def source_row(session: Any, job: Job, source: TrainJobSource | UploadedCheckpointSource
               ) -> tuple[Artifact | Upload, str]:
    """The row of a source checkpoint (the job's tenant's), and how to name it; LookupError
    when it is gone."""
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
    return row, what


def load_model(settings: Settings, job: Job, spec: ModelSpec, source: PlanSource,
               device: torch.device) -> torch.nn.Module:
    store = get_store(settings)
    if isinstance(source, RandomSource):
        seed_torch(source.seed, device)
        return channels_last(build_model(spec).eval().to(device))
    model = build_model(spec)
    with session_scope(settings.database_url) as session:
        row, what = source_row(session, job, source)
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


def load_source(settings: Settings, job: Job, plan: DatasetInputs | UploadedInputs,
                input_shape: list[int]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The whole split (or upload) the inputs are drawn from, its labels (None for uploaded
    inputs) and the indices into it: a job gathers its inputs batch by batch from these."""
    indices = index_array(plan.indices)
    if isinstance(plan, DatasetInputs):
        split = load_split(plan.dataset, settings=settings, tenant=job.tenant)
        if plan.split == "all":
            return split.all_x, split.all_y, indices
        if plan.split == "train":
            return split.x_train, split.y_train, indices
        return split.x_val, split.y_val, indices
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
    return x, None, indices


def load_labelled_inputs(settings: Settings, job: Job, plan: DatasetInputs | UploadedInputs,
                         input_shape: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs as load_inputs gives them, and their labels (int64) when they come from a
    dataset; None for uploaded inputs, which have none."""
    x, y, indices = load_source(settings, job, plan, input_shape)
    return (np.ascontiguousarray(x[indices], dtype=np.float32),
            None if y is None else np.asarray(y[indices], dtype=np.int64))


def batches(x: np.ndarray, indices: np.ndarray | None = None, batch: int = BATCH
            ) -> Iterator[np.ndarray]:
    """The inputs x[indices] (all of x when None), `batch` at a time, as contiguous float32."""
    count = len(x) if indices is None else len(indices)
    for start in range(0, count, batch):
        part = x[start:start + batch] if indices is None else x[indices[start:start + batch]]
        yield np.ascontiguousarray(part, dtype=np.float32)


def extract_batches(model: torch.nn.Module, parts: Iterable[np.ndarray], wanted: list[int], *,
                    pool: dict[str, Any] | None, dtype: str, device: torch.device
                    ) -> Iterator[dict[int, dict[str, np.ndarray]]]:
    """Per input batch, the captured maps per layer index as host numpy arrays in NCHW
    order: 'maps', and 'argmax' for max-pooling layers. Nothing is kept between batches.

    On CPU the arrays are views of the captured tensors in their own layout (channels-last
    from a channels-last model), not yet C-contiguous: the copy to NCHW memory that the .npy
    needs is made by whoever consumes them (a job's NpyStream on its writer thread, beside
    the next batch's forward; np.concatenate in `extract`). On a GPU the copy is made
    there, where it is cheapest, before the maps come to the host."""
    out_dtype = torch.float16 if dtype == "float16" else torch.float32

    def host(t: torch.Tensor) -> np.ndarray:
        return t.numpy() if t.device.type == "cpu" else t.contiguous().cpu().numpy()

    with torch.inference_mode():
        for part in parts:
            xb = channels_last(model, torch.from_numpy(part).to(device))
            got: dict[int, dict[str, np.ndarray]] = {}
            for i, cap in capture(model, xb, wanted, pool).items():
                got[i] = {"maps": host(cap.maps.to(out_dtype))}
                if cap.argmax is not None:
                    got[i]["argmax"] = host(cap.argmax.int())
            yield got


def extract(model: torch.nn.Module, x: np.ndarray, wanted: list[int], *,
            pool: dict[str, Any] | None, dtype: str, device: torch.device,
            batch: int = BATCH) -> dict[int, dict[str, np.ndarray]]:
    """Every batch's maps concatenated (for small inputs, benches and tests; a job streams
    them to the store instead, see FeatureMapsRun)."""
    parts: dict[int, dict[str, list[np.ndarray]]] = {i: {} for i in wanted}
    for got in extract_batches(model, batches(x, batch=batch), wanted, pool=pool, dtype=dtype,
                               device=device):
        for i, arrays in got.items():
            for k, v in arrays.items():
                parts[i].setdefault(k, []).append(v)
    return {i: {k: np.concatenate(v) for k, v in got.items()} for i, got in parts.items()}


class LayerOut:
    """One captured layer's streamed files and statistics during a job."""

    def __init__(self, run: FeatureMapsRun, index: int, total: int) -> None:
        self.run, self.index, self.total = run, index, total
        self.name = layer_names(run.summary)[index]
        self.base = job_key(run.job.id, "feature-maps", self.name)
        self.maps: NpyStream | None = None
        self.argmax: NpyStream | None = None
        self.stats = ChannelStats()
        self.stats_s = 0.0  # CPU seconds of the statistics on the writer thread

    def observe(self, maps: np.ndarray) -> None:
        """On the file's writer thread: the rows' statistics. Timed by that thread's CPU
        time (wall time there would count the seconds the thread waits for a core or the
        GIL while the forward runs); close() adds it to the job's encode_npy_s."""
        t = time.thread_time()
        self.stats.add(maps)
        self.stats_s += time.thread_time() - t

    def add(self, got: dict[str, np.ndarray], first: int) -> list[Artifact]:
        """A batch's rows (inputs first.. on); the eager PNG rows it stored."""
        maps, store = got["maps"], self.run.store
        if self.maps is None:
            self.maps = NpyStream(store, self.base + ".npy", (self.total, *maps.shape[1:]),
                                  maps.dtype, observe=self.observe)
            self.run.streams.append(self.maps)
        if "argmax" in got and self.argmax is None:
            self.argmax = NpyStream(store, f"{self.base}.argmax.npy",
                                    (self.total, *got["argmax"].shape[1:]), got["argmax"].dtype)
            self.run.streams.append(self.argmax)
        self.maps.append(maps)
        if self.argmax is not None:
            self.argmax.append(got["argmax"])
        rows: list[Artifact] = []
        if self.run.png == "eager" and maps.ndim == 4:
            pictures = png_images(np.ascontiguousarray(maps))
            for k in range(first, first + len(maps)):
                t = time.perf_counter()
                blob = next(pictures)
                self.run.timings.encode_png_s += time.perf_counter() - t
                rows.append(self.run._put("feature_map_png", f"{self.name}/{k}",
                                          png_key(self.run.job.id, self.name, k), blob,
                                          {"index": self.index, "image": k}))
        return rows

    def close(self) -> list[Artifact]:
        """The layer's finished files as artifact rows (maps first)."""
        assert self.maps is not None
        row = layer_rows(self.run.summary)[self.index]
        t = time.perf_counter()
        size, sha = self.maps.close()
        self.run.written.append(self.maps.key)
        self.run.timings.encode_npy_s += self.stats_s  # the writer thread has finished
        meta = {"index": self.index, "type": row["type"], "shape": list(self.maps.shape),
                "dtype": str(self.maps.dtype), "bytes": self.maps.nbytes,
                "stats": self.stats.result(), "unpooled_shape": [self.total, *row["output_shape"]]}
        rows = [Artifact(job_id=self.run.job.id, tenant=self.run.job.tenant, kind="feature_map",
                         name=self.name, key=self.maps.key, size=size, sha256=sha, meta=meta)]
        if self.argmax is not None:
            size, sha = self.argmax.close()
            self.run.written.append(self.argmax.key)
            rows.append(Artifact(job_id=self.run.job.id, tenant=self.run.job.tenant,
                                 kind="argmax", name=self.name, key=self.argmax.key, size=size,
                                 sha256=sha, meta={"index": self.index,
                                                   "shape": list(self.argmax.shape),
                                                   "dtype": str(self.argmax.dtype)}))
        self.run.timings.storage_s += time.perf_counter() - t
        return rows


class FeatureMapsRun:
    def __init__(self, settings: Settings, job: Job, worker_id: str) -> None:
        self.settings, self.job, self.worker_id = settings, job, worker_id
        self.request = FeatureMapsJobRequest.model_validate(job.request)
        self.png = png_mode(self.request.png)
        self.summary = job.summary or {}
        self.plan = FeatureMapPlan.model_validate(self.summary["feature_maps"])
        self.store = get_store(settings)
        self.timings = Timings()
        self.written: list[str] = []
        self.streams: list[NpyStream] = []

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

    def stream_all(self, model: torch.nn.Module, x: np.ndarray, indices: np.ndarray,
                   wanted: list[int], device: torch.device, lease: Lease, progress: Progress
                   ) -> tuple[list[Artifact], int, int]:
        """One pass over the inputs, batch by batch: each batch's maps appended to every
        layer's files (and statistics) before the next batch runs. Progress is images done
        out of the total; a cancel (or a lost lease) stops it between two batches."""
        req, total = self.request, len(indices)
        pool = req.pool.model_dump(by_alias=True) if req.pool else None
        outs = {i: LayerOut(self, i, total) for i in wanted}
        rows: list[Artifact] = []
        done = 0
        parts = extract_batches(model, batches(x, indices), wanted, pool=pool, dtype=req.dtype,
                                device=device)
        while True:
            if lease.should_stop():
                raise Stopped()
            t = time.perf_counter()
            got = next(parts, None)
            self.timings.forward_s += time.perf_counter() - t
            if got is None:
                break
            count = 0
            for i, arrays in got.items():
                rows += outs[i].add(arrays, done)
                count = len(arrays["maps"])
            done += count
            progress.value = 0.99 * done / total
        stored = unpooled = 0
        itemsize = 2 if req.dtype == "float16" else 4
        for i in wanted:
            layer_rows = outs[i].close()
            meta = layer_rows[0].meta or {}
            stored += meta["bytes"]
            unpooled += int(np.prod(meta["unpooled_shape"])) * itemsize
            rows = layer_rows + rows
        return rows, stored, unpooled

    def run(self) -> None:
        req, t0 = self.request, time.perf_counter()
        device = pick_device(req.device)
        spec = ModelSpec.model_validate(self.summary["model"])
        model = load_model(self.settings, self.job, spec, self.plan.source, device)
        x, _, indices = load_source(self.settings, self.job, self.plan.inputs, spec.input_shape)
        names = layer_names(self.summary)
        wanted = [names.index(n) for n in self.plan.layers]
        pool = req.pool.model_dump(by_alias=True) if req.pool else None
        self.timings.load_s = time.perf_counter() - t0
        progress = Progress()
        with Lease(db_url=self.settings.database_url, job_id=self.job.id,
                   worker_id=self.worker_id, every_s=self.settings.heartbeat_seconds,
                   progress=progress) as lease:
            try:
                rows, stored, unpooled = self.stream_all(model, x, indices, wanted, device,
                                                         lease, progress)
            except Stopped:
                for stream in self.streams:  # unfinished files are never stored
                    stream.abort()
                raise  # the lease moved on: another attempt may be writing these keys now
            except BaseException:
                for stream in self.streams:
                    stream.abort()
                self.store.discard(self.written)  # no file without its row
                raise
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with session_scope(self.settings.database_url) as session:
                held = artifacts.add(session, job_id=self.job.id, worker_id=self.worker_id,
                                      artifacts=rows)
            self.timings.storage_s += time.perf_counter() - t
            if not held or lease.should_stop():
                raise Stopped()
        n = len(indices)
        result = {
            "layers": self.plan.layers, "images": n, "dtype": req.dtype,
            "pool": pool, "device": str(device), "png": self.png,
            # the maps' data bytes as stored, and what the same maps take unpooled
            "bytes_stored": stored, "bytes_unpooled": unpooled,
            "artifacts": len(rows), "artifact_bytes": sum(r.size for r in rows),
            "timings": self.timings.as_dict(),
            "images_per_second": round(n / max(self.timings.forward_s, 1e-9), 1),
        }
        line = (f"succeeded: {len(wanted)} layers of {n} images in "
                f"{time.perf_counter() - t0:.1f} s, {len(rows)} artifacts "
                f"({result['artifact_bytes']} bytes)")
        with session_scope(self.settings.database_url) as session:
            jobs.finish_job(session, job_id=self.job.id, worker_id=self.worker_id,
                            state=JobState.SUCCEEDED, result=result, log_line=line)


def run_feature_maps(settings: Settings, job: Job, worker_id: str) -> None:
    FeatureMapsRun(settings, job, worker_id).run()
