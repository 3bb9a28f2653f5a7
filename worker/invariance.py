"""One attempt of an invariance job: the model and inputs as a feature-map job loads them, every
measure of models/invariance.py under the job's lease (cancel and timeout honoured between
chunks), and the curves written into the job's result."""

from __future__ import annotations

import time
from typing import Any

import torch

from convoy.featuremaps import layer_names, layer_rows
from convoy.jobspec import InvarianceJobRequest, InvariancePlan
from convoy.settings import Settings
from db import jobs
from db.session import session_scope
from db.states import JobState
from db.tables import Job
from models.invariance import Measured, NonFiniteMaps, measure
from models.spec import ModelSpec
from worker.control import Progress, Stopped
from worker.data import pick_device
from worker.feature_maps import load_labelled_inputs, load_model
from worker.lease import Lease


def magnitude(family: str, value: float) -> float | int:
    return int(value) if family == "translate" else value


def curves(measured: Measured, summary: dict[str, Any], wanted: list[int]) -> dict[str, Any]:
    """The result's `layers` and `output`, as GET /v1/jobs/{id}/invariance answers them."""
    names, rows = layer_names(summary), layer_rows(summary)
    layers = []
    for i in wanted:
        by_family: dict[str, list[dict[str, Any]]] = {}
        for (family, value), (cos, dist) in measured.layers[i].items():
            by_family.setdefault(family, []).append(
                {"magnitude": magnitude(family, value), "cosine": cos, "distance": dist})
        layers.append({"name": names[i], "index": i, "type": rows[i]["type"],
                       "curves": by_family})
    output: dict[str, list[dict[str, Any]]] | None = None
    if measured.output is not None:
        output = {}
        for (family, value), (agree, prob) in measured.output.items():
            output.setdefault(family, []).append(
                {"magnitude": magnitude(family, value), "agreement": agree,
                 "true_class_probability": prob})
    return {"layers": layers, "output": output, "original": measured.original}


def run_invariance(settings: Settings, job: Job, worker_id: str) -> None:
    req = InvarianceJobRequest.model_validate(job.request)
    summary = job.summary or {}
    plan = InvariancePlan.model_validate(summary["invariance"])
    t0 = time.perf_counter()
    device = pick_device(req.device)
    spec = ModelSpec.model_validate(summary["model"])
    model = load_model(settings, job, spec, plan.source, device)
    x, labels = load_labelled_inputs(settings, job, plan.inputs, spec.input_shape)
    names = layer_names(summary)
    wanted = [names.index(n) for n in plan.layers]
    out_shape = summary["output_shape"]
    load_s = time.perf_counter() - t0
    progress = Progress()
    with Lease(db_url=settings.database_url, job_id=job.id, worker_id=worker_id,
               every_s=settings.heartbeat_seconds, progress=progress) as lease:

        def step(done: float) -> None:
            progress.value = 0.99 * done
            if lease.should_stop():
                raise Stopped()

        t, cpu = time.perf_counter(), time.process_time()
        try:
            measured = measure(model, x, labels, wanted, plan.transforms,
                               classes=out_shape[0] if len(out_shape) == 1 else None,
                               device=device, step=step)
        except NonFiniteMaps as exc:  # named as the job names its layers
            raise NonFiniteMaps(exc.index, names[exc.index]) from None
        if device.type == "cuda":
            torch.cuda.synchronize()
        measure_s, measure_cpu_s = time.perf_counter() - t, time.process_time() - cpu
        if lease.should_stop():
            raise Stopped()
    result = {
        **curves(measured, summary, wanted),
        "images": len(x), "transforms": plan.transforms, "device": str(device),
        "images_through_model": measured.images,
        # measure_cpu_s: this process's CPU time for the same pass (on a busy machine, wall
        # time also counts other processes' turns)
        "timings": {"load_s": round(load_s, 4), "measure_s": round(measure_s, 4),
                    "measure_cpu_s": round(measure_cpu_s, 4)},
        # every image through the model (originals and transformed copies) per second
        "images_per_second": round(measured.images / max(measure_s, 1e-9), 1),
    }
    line = (f"succeeded: {len(wanted)} layers, {len(x)} inputs, {measured.images} images "
            f"through the model in {measure_s:.1f} s")
    with session_scope(settings.database_url) as session:
        jobs.finish_job(session, job_id=job.id, worker_id=worker_id, state=JobState.SUCCEEDED,
                        result=result, log_line=line)
