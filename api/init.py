"""Checks a train job's `init` (fine-tune) and `continue` before its row is written: the
source checkpoint exists and is the tenant's, its tensors fit the new model (every name and
shape with `strict`, else the ones that match), and a continued job has the optimizer state
it resumes. Plain Python: the API never imports torch."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.feature_maps import expected_tensors, not_found
from api.submit import summarize_or_422, unprocessable
from convoy.jobspec import InitPlan, TrainJobRequest, TrainJobSource, UploadedCheckpointSource
from db import artifacts, job_reads, uploads
from models.spec import ModelSpec


def _layer(name: str) -> str:
    """`layers.3.weight` -> `layer 3 (layers.3.weight)`."""
    parts = name.split(".")
    return f"layer {parts[1]} ({name})" if len(parts) > 2 else name


def check_init(session: Session, req: TrainJobRequest, summary: dict[str, Any], *,
               tenant: str) -> dict[str, Any] | None:
    """The InitPlan (as JSON) of a valid init, None without one, or a 4xx naming the field
    and, for shapes that differ, the layer."""
    init = req.init
    if init is None:
        if req.continue_:
            raise unprocessable("continue", "continue needs init.job_id: the train job to "
                                            "continue")
        return None
    if (init.job_id is None) == (init.checkpoint_id is None):
        raise unprocessable("init", "give exactly one of job_id (a train job's checkpoint) or "
                                    "checkpoint_id (an uploaded checkpoint)")
    epoch = 0
    source: TrainJobSource | UploadedCheckpointSource
    if init.job_id is not None:
        try:
            job = job_reads.get_job(session, job_id=init.job_id, tenant=tenant, kind="train")
        except job_reads.JobNotFound:
            raise not_found("init.job_id", f"no train job {init.job_id}") from None
        rows = artifacts.checkpoints(session, job_id=job.id)
        if not rows:
            raise unprocessable("init.job_id", f"job {job.id} ({job.state}) has no checkpoint")
        match = rows[-1:] if init.checkpoint in ("last", "latest") \
            else [r for r in rows if r.name == init.checkpoint]
        if not match:
            raise unprocessable("init.checkpoint", f"job {job.id} has no checkpoint "
                                                   f"{init.checkpoint!r}; it has "
                                                   f"{[r.name for r in rows[-5:]]}")
        row = match[0]
        epoch = int((row.meta or {}).get("epoch") or 0)
        source_spec = ModelSpec.model_validate(job.request["model"])
        source = TrainJobSource(job_id=job.id, checkpoint=row.name)
        if req.continue_:
            optimizer = job.request.get("train", {}).get("optimizer", "sgd")
            if optimizer != req.train.optimizer:
                raise unprocessable("train.optimizer", f"continue restores the source's "
                                                       f"{optimizer} state: use {optimizer}")
            if artifacts.find(session, job_id=job.id, tenant=tenant, kind="optimizer",
                              name=row.name.replace(".safetensors",
                                                    ".optimizer.safetensors")) is None:
                raise unprocessable("init.checkpoint", f"{row.name}: its optimizer state was "
                                                       "not kept (retention keeps it for the "
                                                       "newest checkpoints): continue from "
                                                       "`last`")
    else:
        assert init.checkpoint_id is not None
        if req.continue_:
            raise unprocessable("continue", "an uploaded checkpoint has no optimizer state: "
                                            "continue needs init.job_id")
        upload = uploads.get(session, id=init.checkpoint_id, tenant=tenant, kind="checkpoint")
        if upload is None:
            raise not_found("init.checkpoint_id", f"no checkpoint {init.checkpoint_id}")
        source_spec = ModelSpec.model_validate(upload.meta["model"])
        source = UploadedCheckpointSource(checkpoint_id=upload.id)
    have = expected_tensors(source_spec, summarize_or_422(source_spec, field="init"))
    want = expected_tensors(req.model, summary)
    loaded = [n for n in want if n in have and have[n] == want[n]]
    wrong = [n for n in want if n in have and have[n] != want[n]]
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    strict = init.strict or req.continue_
    if strict and (wrong or missing or extra):
        if wrong:
            n = wrong[0]
            message = (f"{_layer(n)} has shape {list(have[n])} in the source checkpoint but "
                       f"{list(want[n])} in this model")
        elif missing:
            message = f"{_layer(missing[0])} is not in the source checkpoint"
        else:
            message = f"the source checkpoint has {_layer(extra[0])}, which this model lacks"
        more = len(wrong) + len(missing) + len(extra) - 1
        raise unprocessable("init", message + (f" ({more} more mismatches)" if more else "")
                            + ("; strict: false loads the layers that match"
                               if not req.continue_ else ""))
    if not loaded:
        raise unprocessable("init", "no tensor of the source checkpoint fits this model")
    plan = InitPlan(source=source, epoch=epoch if req.continue_ else 0,
                    continued=req.continue_, loaded=loaded, skipped=wrong + missing)
    return plan.model_dump(mode="json")
