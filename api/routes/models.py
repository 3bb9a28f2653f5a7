"""Validate a model spec and return its summary."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import PrincipalDep, SettingsDep
from api.schemas import ModelSummary
from api.submit import summarize_or_422
from models.spec import ModelSpec

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("/summary", response_model=ModelSummary, response_model_exclude_unset=True)
def summarize_model(spec: ModelSpec, principal: PrincipalDep, settings: SettingsDep
                    ) -> ModelSummary:
    return ModelSummary.model_validate(summarize_or_422(spec, field="", settings=settings))
