"""Checks an evaluate request before its row is written: the model source and inputs as a
feature-map job resolves them (every input of the split by default), a model whose output
is class scores, and the work it costs. Plain Python: the API never imports torch."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.feature_maps import resolve_request
from api.submit import job_flops_limit, unprocessable
from convoy.jobspec import EvaluateJobRequest, EvaluatePlan
from convoy.settings import Settings

# the predictions file holds every input's top-k: about 100 bytes each
MAX_EVALUATE_INPUTS = 100_000


def check_evaluate(session: Session, req: EvaluateJobRequest, settings: Settings, *,
                   tenant: str, store: Any = None) -> dict[str, Any]:
    """The job summary of a valid evaluate request, or a 4xx naming the field."""
    got = resolve_request(session, req, settings, tenant=tenant, store=store,
                          default_count=MAX_EVALUATE_INPUTS + 1)
    if got.inputs.count > MAX_EVALUATE_INPUTS:
        raise unprocessable("inputs", f"more than {MAX_EVALUATE_INPUTS} inputs: give "
                                      "`indices` (up to 4096 per job) to score part of them")
    summary = got.summary
    out = summary["output_shape"]
    if len(out) != 1:
        raise unprocessable(got.field, f"the model's output is {out}, not a vector of class "
                                       "scores: end it with a linear layer (or global pooling "
                                       "and flatten)")
    work = int(summary["total_flops"]) * got.inputs.count
    limit = job_flops_limit(settings, tenant)
    if work > limit:
        raise unprocessable("inputs", f"estimated work {work:.3g} FLOPs ({got.inputs.count} "
                                      f"inputs) exceeds the limit max_job_flops={limit:.3g} of "
                                      f"tenant {tenant!r}; ask for fewer inputs")
    plan = EvaluatePlan(source=got.source, inputs=got.inputs, classes=int(out[0]),
                        top_k=min(req.top_k, int(out[0])))
    summary["evaluate"] = plan.model_dump(mode="json")
    return summary
