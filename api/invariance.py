"""Checks an invariance request before its row is written: the model source, inputs and layers
as a feature-map job resolves them, then the transforms against the input size and the work
they cost. Plain Python: the API never imports torch."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.feature_maps import resolve_request
from api.submit import job_flops_limit, unprocessable
from convoy.jobspec import TRANSFORM_FAMILIES, InvarianceJobRequest, InvariancePlan
from convoy.settings import Settings

# images through the model per input, per magnitude: four directions, +θ and -θ, one scaling
VARIANTS = {"translate": 4, "rotate": 2, "scale": 1}


def forward_passes(transforms: dict[str, list[int | float]]) -> int:
    """Per input: the original, and every transformed copy."""
    return 1 + sum(VARIANTS[family] * len(values) for family, values in transforms.items())


def check_transforms(req: InvarianceJobRequest, input_shape: list[int]
                     ) -> dict[str, list[int | float]]:
    """The families asked for, magnitudes ascending (duplicates once), or a 422 naming the
    field: a translation must leave part of the input in view in all four directions."""
    given = req.transforms.model_dump(exclude_none=True)
    if not given:
        raise unprocessable("transforms", f"give at least one of {', '.join(TRANSFORM_FAMILIES)}"
                                          " with a list of magnitudes")
    _, h, w = input_shape
    for k, pixels in enumerate(given.get("translate", [])):
        if pixels >= min(h, w):
            raise unprocessable(f"transforms.translate.{k}",
                                f"a translation of {pixels} pixels moves a {h}x{w} input out "
                                f"of view; at most {min(h, w) - 1}")
    return {family: sorted(set(given[family])) for family in TRANSFORM_FAMILIES
            if family in given}


def check_invariance(session: Session, req: InvarianceJobRequest, settings: Settings, *,
                     tenant: str, store: Any = None) -> dict[str, Any]:
    """The job summary of a valid invariance request, or a 4xx naming the field."""
    got = resolve_request(session, req, settings, tenant=tenant, store=store)
    summary = got.summary
    transforms = check_transforms(req, summary["input_shape"])
    passes = forward_passes(transforms)
    work = int(summary["total_flops"]) * passes * got.inputs.count
    limit = job_flops_limit(settings, tenant)
    if work > limit:
        raise unprocessable("transforms", f"estimated work {work:.3g} FLOPs ({passes} forward "
                                          f"passes x {got.inputs.count} inputs) exceeds the "
                                          f"limit max_job_flops={limit:.3g} of tenant "
                                          f"{tenant!r}; ask for fewer magnitudes or inputs")
    plan = InvariancePlan(source=got.source, inputs=got.inputs, layers=got.layer_names,
                          transforms=transforms, forward_passes=passes)
    summary["invariance"] = plan.model_dump(mode="json")
    return summary
