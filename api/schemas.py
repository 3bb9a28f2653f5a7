"""Response schemas (requests live in convoy.jobspec, shared with the worker)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class JobOut(BaseModel):
    id: str
    kind: str
    name: str
    state: str
    progress: float
    attempt: int
    max_attempts: int
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    summary: dict[str, Any] | None
    result: dict[str, Any] | None
    request: dict[str, Any]
    # running time allowed across attempts, seconds (None for jobs from before it existed)
    timeout_seconds: float | None = None


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class MetricPoint(BaseModel):
    step: int
    epoch: int
    value: float


class MetricsOut(BaseModel):
    series: dict[str, list[MetricPoint]]


class CheckpointOut(BaseModel):
    name: str
    epoch: int | None
    size: int
    sha256: str
    created_at: datetime


class LogLine(BaseModel):
    at: datetime
    level: str
    message: str


class DatasetOut(BaseModel):
    id: str
    name: str
    builtin: bool
    input_shape: list[int]
    num_classes: int
    samples: int
    size: int | None = None
    sha256: str | None = None
    created_at: datetime | None = None


class UploadOut(BaseModel):
    id: str
    kind: str
    name: str
    size: int
    sha256: str
    meta: dict[str, Any]
    created_at: datetime


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Tenants name rows in every table and appear in logs: a short, plain identifier.
    tenant: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    name: Annotated[str, Field(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")] = ""
    admin: bool = False


class TokenOut(BaseModel):
    id: str
    tenant: str
    name: str
    is_admin: bool
    created_at: datetime
    revoked_at: datetime | None
    token: str | None = None


class TokenRevokedOut(TokenOut):
    """The answer to DELETE /v1/tokens/{id}: the token, and whether it was the caller's own."""

    revoked_self: bool = Field(description="true when the token revoked is the one this "
                                           "request was made with: it no longer authenticates")
    message: str
