"""Checks an export request before its row is written: the model source as a feature-map job
resolves it, and the model's limits. Plain Python: the API never imports torch (nor
onnxruntime: the worker exports and checks the file)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.feature_maps import resolve_source
from api.submit import check_model_limits, summarize_or_422
from convoy.jobspec import ExportJobRequest, ExportPlan, RandomSource
from convoy.settings import Settings

FILENAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}


def check_export(session: Session, req: ExportJobRequest, settings: Settings, *,
                 tenant: str) -> dict[str, Any]:
    """The job summary of a valid export request, or a 4xx naming the field."""
    spec, source = resolve_source(session, req, tenant=tenant)
    field = "source.model" if isinstance(source, RandomSource) else "source"
    summary = summarize_or_422(spec, field=field)
    check_model_limits(summary, settings, batch_size=16, field=field)
    summary["model"] = spec.model_dump(mode="json")
    plan = ExportPlan(source=source, format=req.format, filename=FILENAMES[req.format])
    summary["export"] = plan.model_dump(mode="json")
    return summary
