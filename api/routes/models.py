"""Validate a model spec and return its summary."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.deps import PrincipalDep, SettingsDep
from api.submit import summarize_or_422
from models.spec import ModelSpec

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.post("/summary")
def summarize_model(spec: ModelSpec, principal: PrincipalDep, settings: SettingsDep
                    ) -> dict[str, Any]:
    return summarize_or_422(spec, field="", settings=settings)
