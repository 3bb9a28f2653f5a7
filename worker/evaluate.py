"""One attempt of an evaluate job: the model and inputs as a feature-map job loads them, one
inference pass in batches under the job's lease, then the scores (loss, accuracy, confusion
matrix, per-class precision and recall where labels exist) into the result and every
input's top-k classes into predictions.json (GET /v1/jobs/{id}/predictions)."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from convoy.artifacts import get_store, job_key
from convoy.jobspec import EvaluatePlan, index_array
from convoy.settings import Settings
from db import artifacts, jobs
from db.session import session_scope
from db.states import JobState
from db.tables import Artifact, Job
from models.capture import channels_last
from models.spec import ModelSpec
from worker.control import Progress, Stopped
from worker.data import pick_device
from worker.feature_maps import load_labelled_inputs, load_model
from worker.lease import Lease

BATCH = 512
MAX_CONFUSION_CLASSES = 100


def scores(logits: torch.Tensor, labels: np.ndarray | None, top_k: int) -> dict[str, Any]:
    """The result's figures from float32 logits (N, classes) and int labels (or None)."""
    classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1)
    pred = logits.argmax(1).numpy()
    out: dict[str, Any] = {"inputs": len(logits), "top_k": top_k, "classes": classes,
                           "labelled": labels is not None}
    if labels is None or len(labels) == 0:
        return out
    y = torch.from_numpy(labels)
    valid = (y >= 0) & (y < classes)
    loss = F.cross_entropy(logits[valid], y[valid], reduction="sum").item() \
        if bool(valid.any()) else float("nan")
    top = probs.topk(top_k, dim=1).indices
    out["loss"] = loss / max(1, int(valid.sum()))
    out["accuracy"] = float((pred == labels).mean())
    out["top_k_accuracy"] = float((top == y[:, None]).any(1).float().mean())
    out["labels_out_of_range"] = int((~valid).sum())
    if classes <= MAX_CONFUSION_CLASSES:
        ok = valid.numpy()
        confusion = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(confusion, (labels[ok], pred[ok]), 1)
        per_class = []
        for c in range(classes):
            predicted, support = int(confusion[:, c].sum()), int(confusion[c].sum())
            per_class.append({
                "precision": confusion[c, c] / predicted if predicted else None,
                "recall": confusion[c, c] / support if support else None,
                "support": support})
        out["confusion"] = confusion.tolist()
        out["per_class"] = [{k: (float(v) if isinstance(v, np.floating) else v)
                             for k, v in row.items()} for row in per_class]
    return out


def predictions(probs: torch.Tensor, indices: list[int], labels: np.ndarray | None,
                top_k: int) -> list[dict[str, Any]]:
    values, classes = probs.topk(top_k, dim=1)
    return [{"index": int(i),
             "label": int(labels[n]) if labels is not None else None,
             "top": [{"class": int(c), "probability": float(p)}
                     for c, p in zip(classes[n].tolist(), values[n].tolist(), strict=True)]}
            for n, i in enumerate(indices)]


def run_evaluate(settings: Settings, job: Job, worker_id: str) -> None:
    summary = job.summary or {}
    plan = EvaluatePlan.model_validate(summary["evaluate"])
    device = pick_device(str((job.request or {}).get("device") or "auto"))
    spec = ModelSpec.model_validate(summary["model"])
    model = load_model(settings, job, spec, plan.source, device)
    x, labels = load_labelled_inputs(settings, job, plan.inputs, spec.input_shape)
    progress = Progress()
    store = get_store(settings)
    with Lease(db_url=settings.database_url, job_id=job.id, worker_id=worker_id,
               every_s=settings.heartbeat_seconds, progress=progress) as lease:
        started = time.perf_counter()
        parts: list[torch.Tensor] = []
        with torch.inference_mode():
            for start in range(0, len(x), BATCH):
                xb = channels_last(model, torch.from_numpy(x[start:start + BATCH]).to(device))
                parts.append(model(xb).float().cpu())
                progress.value = 0.9 * min(1.0, (start + BATCH) / max(1, len(x)))
                if lease.should_stop():
                    raise Stopped()
        seconds = time.perf_counter() - started
        logits = torch.cat(parts) if parts else torch.zeros((0, plan.classes))
        result = scores(logits, labels, plan.top_k)
        blob = json.dumps(predictions(torch.softmax(logits, 1),
                                      index_array(plan.inputs.indices).tolist(), labels,
                                      plan.top_k)).encode()
        key = job_key(job.id, "predictions.json")
        size, sha = store.put_bytes(key, blob)
        row = Artifact(job_id=job.id, tenant=job.tenant, kind="predictions",
                       name="predictions.json", key=key, size=size, sha256=sha,
                       meta={"inputs": len(x)})
        with session_scope(settings.database_url) as session:
            held = artifacts.add(session, job_id=job.id, worker_id=worker_id, artifacts=[row])
        if not held or lease.should_stop():
            raise Stopped()
    result["device"] = str(device)
    result["images_per_second"] = round(len(x) / max(seconds, 1e-9), 1)
    line = (f"succeeded: {len(x)} inputs scored"
            + (f", accuracy {result['accuracy']:.4f}" if "accuracy" in result else ""))
    with session_scope(settings.database_url) as session:
        jobs.finish_job(session, job_id=job.id, worker_id=worker_id, state=JobState.SUCCEEDED,
                        result=result, log_line=line)
