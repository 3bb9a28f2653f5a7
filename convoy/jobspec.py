"""What a job asks for: the request bodies of POST /v1/jobs, validated by the API at
submission and read again by the worker from the job row."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from convoy.datasets import DigitsRef, SyntheticRef, UploadRef
from models.spec import ModelSpec

Name = Annotated[str, Field(max_length=128, pattern=r"^[\w .:@+-]*$")]


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: Annotated[int, Field(ge=1)] = 10
    batch_size: Annotated[int, Field(ge=1)] = 64
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: Annotated[float, Field(gt=0, le=10)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    # bf16 autocast on CUDA (ignored on CPU)
    amp: bool = True
    compile: bool = False


Device = Literal["auto", "cpu", "cuda"]


class Resources(BaseModel):
    """What a train job runs on: `devices` DistributedDataParallel ranks on one host (GPUs
    with device cuda, one-thread CPU processes with device cpu); train.batch_size stays the
    global batch. Bounded by the server's max_devices_per_job at submission."""

    model_config = ConfigDict(extra="forbid")

    devices: Annotated[int, Field(ge=1, le=1024)] = 1
    # batch norm statistics synchronised across ranks (else each rank keeps its own)
    sync_batch_norm: bool = False
# Running time allowed (seconds, summed over attempts); None: the server's default.
Timeout = Annotated[float, Field(gt=0, allow_inf_nan=False)] | None


class TrainJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["train"]
    name: Name = ""
    model: ModelSpec
    dataset: Annotated[DigitsRef | SyntheticRef | UploadRef, Field(union_mode="left_to_right")]
    train: TrainConfig = TrainConfig()
    device: Device = "auto"
    resources: Resources = Resources()
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    timeout: Timeout = None


class CheckpointSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None
    checkpoint: Annotated[str, Field(max_length=64, pattern=r"^[\w.-]+$")] | None = None
    checkpoint_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None
    model: ModelSpec | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0


class InputsRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: Annotated[DigitsRef | SyntheticRef | UploadRef, Field(union_mode="left_to_right")] \
        | Literal["digits", "synthetic"] | None = None
    indices: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=4096)] \
        | None = None
    split: Literal["train", "val", "all"] = "all"
    input_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None


class PoolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["max", "avg"] = "max"
    kernel_size: Annotated[int, Field(ge=1, le=256)] | None = None
    global_: bool = Field(False, alias="global")


class FeatureMapsJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal["feature_maps"]
    name: Name = ""
    source: CheckpointSource
    inputs: InputsRef
    layers: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=512)] \
        | None = None
    dtype: Literal["float32", "float16"] = "float32"
    pool: PoolRequest | None = None
    png: bool = True
    device: Device = "auto"
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    timeout: Timeout = None


JobRequest = Annotated[TrainJobRequest | FeatureMapsJobRequest, Field(discriminator="kind")]


def dump(request: BaseModel) -> dict[str, Any]:
    return request.model_dump(mode="json", by_alias=True, exclude_none=False)


# -- the feature-map plan: what the API resolved at submission, for the worker --------------
# Stored in the job's summary under "feature_maps" (users see it there too) and read back by
# the worker with FeatureMapPlan.model_validate: every field by attribute, none by string key.

class TrainJobSource(BaseModel):
    type: Literal["train_job"] = "train_job"
    job_id: str
    checkpoint: str  # the checkpoint's name, e.g. epoch-0003.safetensors


class UploadedCheckpointSource(BaseModel):
    type: Literal["checkpoint"] = "checkpoint"
    checkpoint_id: str


class RandomSource(BaseModel):
    type: Literal["random"] = "random"
    seed: int


PlanSource = Annotated[TrainJobSource | UploadedCheckpointSource | RandomSource,
                       Field(discriminator="type")]


class DatasetInputs(BaseModel):
    dataset: Annotated[DigitsRef | SyntheticRef | UploadRef, Field(union_mode="left_to_right")]
    split: Literal["train", "val", "all"]
    indices: list[int]
    count: int


class UploadedInputs(BaseModel):
    input_id: str
    format: str  # npy, png or jpeg
    indices: list[int]
    count: int


class FeatureMapPlan(BaseModel):
    source: PlanSource
    inputs: DatasetInputs | UploadedInputs
    layers: list[str]  # layer names, in model order
    estimated_bytes: int
    estimated_bytes_unpooled: int
