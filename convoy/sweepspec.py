"""What a sweep asks for: the request body of POST /v1/sweeps (issue 20), and the one way a
trial's params are written into the base train job body."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from convoy.jobspec import Name

MAX_SWEEP_TRIALS = 500
MAX_SWEEP_PARALLEL = 64
MAX_CHOICES = 64
MAX_PARAMS = 32
# the train job's result figures a sweep can optimise (each written per epoch as a metric)
Metric = Literal["val_accuracy", "val_loss", "train_accuracy", "train_loss"]
Path = Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z_][\w]*(\.[\w]+)*$")]
Scalar = int | float | str | bool
Finite = Annotated[float, Field(allow_inf_nan=False)]


class FloatParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["float"]
    low: Finite
    high: Finite
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> FloatParam:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError("log needs low > 0")
        return self


class IntParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["int"]
    low: Annotated[int, Field(ge=-(2**31), le=2**31)]
    high: Annotated[int, Field(ge=-(2**31), le=2**31)]
    log: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> IntParam:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log needs low > 0")
        return self


class CategoricalParam(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["categorical"]
    choices: Annotated[list[Annotated[Scalar, Field(union_mode="left_to_right")]],
                       Field(min_length=1, max_length=MAX_CHOICES)]

    @model_validator(mode="after")
    def _distinct(self) -> CategoricalParam:
        if len({(type(c).__name__, c) for c in self.choices}) != len(self.choices):
            raise ValueError("choices must be distinct")
        return self


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class Objective(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: Metric = "val_accuracy"
    mode: Literal["max", "min"] = "max"


class PrunerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["none", "median", "asha"] = "none"
    # no trial is pruned before it has run this many epochs
    min_epochs: Annotated[int, Field(ge=1, le=1000)] = 1
    reduction_factor: Annotated[int, Field(ge=2, le=100)] = 3
    # median: trials that must have finished before any is pruned
    startup_trials: Annotated[int, Field(ge=0, le=MAX_SWEEP_TRIALS)] = 1


class SweepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name = ""
    base: dict[str, Any]  # a train job body; validated as one in the API
    space: Annotated[dict[Path, Param], Field(min_length=1, max_length=MAX_PARAMS)]
    objective: Objective = Objective()
    trials: Annotated[int, Field(ge=1, le=MAX_SWEEP_TRIALS)] = 10
    parallel: Annotated[int, Field(ge=1, le=MAX_SWEEP_PARALLEL)] = 2
    sampler: Literal["random", "grid", "tpe"] = "tpe"
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    pruner: PrunerSpec = PrunerSpec()


class BadPath(ValueError):
    pass


def _walk(body: Any, path: str) -> tuple[Any, str | int]:
    """The container holding `path`'s last part, and that part; BadPath when the path does
    not name an existing field of `body`."""
    parts = path.split(".")
    node = body
    for i, part in enumerate(parts):
        key: str | int
        if isinstance(node, dict) and part in node:
            key = part
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            key = int(part)
        else:
            where = ".".join(parts[:i]) or "the body"
            raise BadPath(f"{path}: {where} has no field {part!r}")
        if i == len(parts) - 1:
            return node, key
        node = node[key]
    raise BadPath(path)  # unreachable: a path has at least one part


def check_path(body: dict[str, Any], path: str, param: FloatParam | IntParam | CategoricalParam
               ) -> None:
    """BadPath unless `path` names a scalar field of `body` (a number for int/float)."""
    node, key = _walk(body, path)
    value = node[key]
    if isinstance(value, dict | list):
        raise BadPath(f"{path}: names an object or list, not one value")
    if param.type != "categorical" and (isinstance(value, bool)
                                        or not isinstance(value, int | float)):
        kind = type(value).__name__ if value is not None else "null"
        raise BadPath(f"{path}: the field is {kind}, not a number; a {param.type} range "
                      "needs a numeric field")


def apply(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with each path set to its param's value."""
    body = copy.deepcopy(base)
    for path, value in params.items():
        node, key = _walk(body, path)
        node[key] = value
    return body
