"""One attempt of an export job: the model as a feature-map job loads it (on the CPU), written
as ONNX (torch's TorchScript-based exporter, `dynamo=False`: it needs neither onnx nor
onnxscript, and handles every layer Convoy builds) or TorchScript (torch.jit.trace), both
with a dynamic batch dimension. The file is then run (onnxruntime, or torch.jit.load) on a
fixed batch at two batch sizes, and the largest absolute difference from PyTorch goes into
`result.max_abs_diff`; the file into the store (GET /v1/jobs/{id}/export)."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import torch

from convoy.artifacts import get_store, job_key
from convoy.jobspec import ExportJobRequest, ExportPlan
from convoy.settings import Settings
from db import artifacts, jobs
from db.session import session_scope
from db.states import JobState
from db.tables import Artifact, Job
from models.spec import ModelSpec
from worker.control import Progress, Stopped
from worker.feature_maps import load_model
from worker.lease import Lease

CHECK_BATCH = 16
CHECK_SEED = 0


def check_batch(input_shape: list[int], n: int = CHECK_BATCH) -> torch.Tensor:
    """The fixed batch every export is checked on: uniform [0, 1) from a fixed seed."""
    gen = torch.Generator().manual_seed(CHECK_SEED)
    return torch.rand((n, *input_shape), generator=gen)


def to_onnx(model: torch.nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, (example,), buf,  # type: ignore[arg-type]
                          dynamo=False, input_names=["input"],
                          output_names=["output"], opset_version=opset,
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buf.getvalue()


def to_torchscript(model: torch.nn.Module, example: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, buf)
    return buf.getvalue()


def run_exported(fmt: str, blob: bytes, x: np.ndarray) -> np.ndarray:
    if fmt == "onnx":
        import onnxruntime as ort  # type: ignore[import-untyped]

        session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        return np.asarray(session.run(None, {"input": x})[0])
    loaded = torch.jit.load(io.BytesIO(blob), map_location="cpu")
    with torch.inference_mode():
        return loaded(torch.from_numpy(x)).numpy()


def export_model(model: torch.nn.Module, input_shape: list[int], fmt: str, opset: int
                 ) -> tuple[bytes, dict[str, Any]]:
    """The exported file, and its check: max |exported - PyTorch| over the fixed batch, run
    at two batch sizes (the full batch and 3) so that the dynamic dimension is exercised."""
    model = model.float().eval().to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    example = check_batch(input_shape, 2)
    with torch.inference_mode(False), torch.no_grad():
        blob = to_onnx(model, example, opset) if fmt == "onnx" else to_torchscript(model, example)
    x = check_batch(input_shape)
    with torch.inference_mode():
        want = model(x).float().numpy()
    diffs = []
    for n in (CHECK_BATCH, 3):
        got = run_exported(fmt, blob, x[:n].numpy())
        if got.shape != want[:n].shape:
            raise ValueError(f"the exported model answered shape {list(got.shape)} for a "
                             f"batch of {n}; PyTorch {list(want[:n].shape)}")
        diffs.append(float(np.abs(got - want[:n]).max()))
    return blob, {"max_abs_diff": max(diffs), "check_batch": CHECK_BATCH,
                  "batch_sizes_checked": [CHECK_BATCH, 3]}


def run_export(settings: Settings, job: Job, worker_id: str) -> None:
    req = ExportJobRequest.model_validate(job.request)
    summary = job.summary or {}
    plan = ExportPlan.model_validate(summary["export"])
    spec = ModelSpec.model_validate(summary["model"])
    device = torch.device("cpu")  # the file is checked against onnxruntime's CPU provider
    model = load_model(settings, job, spec, plan.source, device)
    progress = Progress()
    store = get_store(settings)
    with Lease(db_url=settings.database_url, job_id=job.id, worker_id=worker_id,
               every_s=settings.heartbeat_seconds, progress=progress) as lease:
        blob, check = export_model(model, spec.input_shape, plan.format, req.opset)
        progress.value = 0.9
        if lease.should_stop():
            raise Stopped()
        key = job_key(job.id, "export", plan.filename)
        size, sha = store.put_bytes(key, blob)
        row = Artifact(job_id=job.id, tenant=job.tenant, kind="export", name=plan.filename,
                       key=key, size=size, sha256=sha, meta={"format": plan.format})
        with session_scope(settings.database_url) as session:
            held = artifacts.add(session, job_id=job.id, worker_id=worker_id, artifacts=[row])
        if not held or lease.should_stop():
            raise Stopped()
    result = {"format": plan.format, **check, "bytes": size, "sha256": sha,
              "opset": req.opset if plan.format == "onnx" else None, "device": "cpu"}
    line = (f"succeeded: {plan.filename} ({size} bytes), max |exported - PyTorch| "
            f"{check['max_abs_diff']:.3g}")
    with session_scope(settings.database_url) as session:
        jobs.finish_job(session, job_id=job.id, worker_id=worker_id, state=JobState.SUCCEEDED,
                        result=result, log_line=line)
