"""Typed results of the Convoy API, as the client hands them out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATES = ("succeeded", "failed", "canceled")


@dataclass(frozen=True)
class Job:
    id: str
    kind: str
    name: str
    state: str
    progress: float
    attempt: int
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    summary: dict[str, Any] | None
    result: dict[str, Any] | None
    raw: dict[str, Any] = field(repr=False, compare=False)
    # a queued job that cannot start now says why (no live worker for its queue, ...)
    waiting_reason: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(id=data["id"], kind=data["kind"], name=data.get("name", ""),
                   state=data["state"], progress=data.get("progress", 0.0),
                   attempt=data.get("attempt", 1), error=data.get("error"),
                   created_at=data["created_at"], started_at=data.get("started_at"),
                   finished_at=data.get("finished_at"), summary=data.get("summary"),
                   result=data.get("result"), raw=data,
                   waiting_reason=data.get("waiting_reason"))

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class Event:
    """One server-sent event: `state`, `progress` or `metric`; `id` resumes the stream."""

    type: str
    id: str | None
    data: dict[str, Any]


@dataclass(frozen=True)
class MetricPoint:
    step: int
    epoch: int
    value: float


@dataclass(frozen=True)
class Checkpoint:
    name: str
    epoch: int | None
    size: int
    sha256: str


@dataclass(frozen=True)
class FeatureMapLayer:
    name: str
    index: int | None
    type: str | None
    shape: list[int]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FeatureMapLayer:
        return cls(name=data["name"], index=data.get("index"), type=data.get("type"),
                   shape=list(data.get("shape") or []), raw=data)
