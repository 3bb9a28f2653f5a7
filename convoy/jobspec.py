"""What a job asks for: the request bodies of POST /v1/jobs, validated by the API at
submission and read again by the worker from the job row."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from convoy.datasets import DigitsRef, SyntheticRef, UploadRef
from models.spec import ModelSpec

Name = Annotated[str, Field(max_length=128, pattern=r"^[\w .:@+-]*$")]


class RandomCrop(BaseModel):
    """Pad every side by `padding` pixels with zeros, then crop a window of the input's size
    at a random place (the CIFAR recipe: padding 4)."""
    model_config = ConfigDict(extra="forbid")
    padding: Annotated[int, Field(ge=1, le=256)]


class Augment(BaseModel):
    """Random changes to each training batch, drawn on the training device for the whole
    batch at once, from (seed, epoch): a resumed run draws the same ones. Applied in this
    order: random_crop, translate, hflip. Validation data is never augmented."""
    model_config = ConfigDict(extra="forbid")
    random_crop: RandomCrop | None = None
    hflip: bool = Field(False, description="flip half the images left to right")
    translate: Annotated[int, Field(ge=0, le=256, description=(
        "shift each image by up to this many pixels on each axis (uniform integers), "
        "repeating the edge pixels into the uncovered border"))] = 0

    def largest_shift(self) -> int:
        return max(self.random_crop.padding if self.random_crop else 0, self.translate)


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
    augment: Augment | None = None


RetainedMetric = Literal["val_accuracy", "val_loss", "train_accuracy", "train_loss"]


class CheckpointPolicy(BaseModel):
    """Which checkpoints a train job keeps (convoy/retention.py): after each epoch, the union
    of the `keep_last` newest and the `keep_best` best by `metric`; the newest always.
    `keep_last: null` keeps every checkpoint."""

    model_config = ConfigDict(extra="forbid")

    keep_last: Annotated[int, Field(ge=1, le=100_000)] | None = 3
    keep_best: Annotated[int, Field(ge=0, le=100_000)] = 1
    metric: RetainedMetric = "val_accuracy"
    mode: Literal["max", "min"] = "max"


class CheckpointEvery(BaseModel):
    """How often a train job writes a checkpoint (README, "Checkpoint cadence"): at an epoch
    when at least `epochs` epochs and `min_seconds` seconds have passed since the last one;
    the last epoch always, and cancel and warm shutdown write the last finished epoch's.
    Epochs in between still record their metrics and progress."""

    model_config = ConfigDict(extra="forbid")

    epochs: Annotated[int, Field(ge=1, le=100_000)] = 1
    min_seconds: Annotated[float, Field(ge=0, le=7 * 24 * 3600, allow_inf_nan=False)] = 0.0


class InitFrom(BaseModel):
    """Weights a train job starts from: a train job's checkpoint (`job_id`, `checkpoint` a
    name or `last`) or an uploaded one (`checkpoint_id`). `strict: false` loads the tensors
    whose names and shapes match and leaves the others as seeded (the summary names them)."""

    model_config = ConfigDict(extra="forbid")

    job_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None
    checkpoint: Annotated[str, Field(max_length=64, pattern=r"^[\w.-]+$")] = "last"
    checkpoint_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None
    strict: bool = True


Device = Literal["auto", "cpu", "cuda"]


class Resources(BaseModel):
    """What a train job runs on: `devices` DistributedDataParallel ranks on one host (GPUs
    with device cuda, one-thread CPU processes with device cpu); train.batch_size stays the
    global batch. Bounded by the server's max_devices_per_job at submission."""

    model_config = ConfigDict(extra="forbid")

    devices: Annotated[int, Field(ge=1, le=1024)] = 1
    # batch norm statistics synchronised across ranks (else each rank keeps its own)
    sync_batch_norm: bool = False
# 0 (least urgent) to 9 (most): a queued job of higher priority starts before lower ones
# queued earlier (convoy.queue.enqueue; what each broker guarantees: docs/reliability.md).
DEFAULT_PRIORITY = 5
Priority = Annotated[int, Field(ge=0, le=9, description=(
    "0 (least urgent) to 9 (most urgent); a higher-priority job starts before lower-priority "
    "jobs queued earlier"))]
# Running time allowed (seconds, summed over attempts); None: the server's default.
Timeout = Annotated[float, Field(gt=0, allow_inf_nan=False)] | None


class TrainJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal["train"]
    name: Name = ""
    model: ModelSpec
    dataset: Annotated[DigitsRef | SyntheticRef | UploadRef, Field(union_mode="left_to_right")]
    train: TrainConfig = TrainConfig()
    checkpoints: CheckpointPolicy = CheckpointPolicy()
    # None: the worker's CONVOY_CHECKPOINT_EVERY_EPOCHS / CONVOY_CHECKPOINT_MIN_SECONDS
    checkpoint_every: CheckpointEvery | None = None
    init: InitFrom | None = None
    # with init.job_id: also restore the optimizer state, and number epochs on from the
    # source checkpoint's (train.epochs more); the lr schedule runs over the total
    continue_: bool = Field(False, alias="continue")
    device: Device = "auto"
    resources: Resources = Resources()
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    timeout: Timeout = None
    priority: Priority = DEFAULT_PRIORITY


class CheckpointSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    job_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None
    checkpoint: Annotated[str, Field(max_length=64, pattern=r"^[\w.-]+$")] | None = None
    checkpoint_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None
    model: ModelSpec | None = None
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0


# the most inputs one feature-map job takes (a whole split, as a range or "all")
MAX_INPUTS = 100_000


class IndexRange(BaseModel):
    """Inputs start..stop-1 of the split, in order (a whole split without listing it)."""

    model_config = ConfigDict(extra="forbid")
    start: Annotated[int, Field(ge=0, strict=True)] = 0
    stop: Annotated[int, Field(ge=1, strict=True)]

    @property
    def count(self) -> int:
        return max(0, self.stop - self.start)


Indices = list[int] | IndexRange


def index_array(indices: Indices) -> Any:
    """The indices as an int64 numpy array (a range is expanded only here, in the worker)."""
    import numpy as np

    if isinstance(indices, IndexRange):
        return np.arange(indices.start, indices.stop, dtype=np.int64)
    return np.asarray(indices, dtype=np.int64)


class InputsRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dataset: Annotated[DigitsRef | SyntheticRef | UploadRef, Field(union_mode="left_to_right")] \
        | Literal["digits", "synthetic"] | None = None
    # a list, a {"start", "stop"} range, or "all" (the whole split)
    indices: Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=4096)] \
        | IndexRange | Literal["all"] | None = None
    split: Literal["train", "val", "all"] = "all"
    input_id: Annotated[str, Field(max_length=64, pattern=r"^[0-9a-f]+$")] | None = None


class PoolRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["max", "avg"] = "max"
    kernel_size: Annotated[int, Field(ge=1, le=256)] | None = None
    global_: bool = Field(False, alias="global")


# layer names or indices; None: every layer
Layers = Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=512)] | None


def png_mode(png: str | bool) -> str:
    """A request's png field as lazy, eager or off."""
    if isinstance(png, bool):
        return "eager" if png else "off"
    return png


class FeatureMapsJobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    kind: Literal["feature_maps"]
    name: Name = ""
    source: CheckpointSource
    inputs: InputsRef
    layers: Layers = None
    dtype: Literal["float32", "float16"] = "float32"
    pool: PoolRequest | None = None
    # lazy: PNG grids are rendered on request and cached; eager: stored by the job; off: none.
    # true/false (the old form) mean eager/off.
    png: Literal["lazy", "eager", "off"] | bool = "lazy"
    device: Device = "auto"
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    timeout: Timeout = None
    priority: Priority = DEFAULT_PRIORITY


MAX_MAGNITUDES = 32


Magnitudes = Field(min_length=1, max_length=MAX_MAGNITUDES)
Pixels = Annotated[int, Field(ge=1, le=4096, strict=True)]
Degrees = Annotated[float, Field(gt=0, le=180, allow_inf_nan=False)]
# 1/64 .. 64: a factor below 1/64 shrinks any input to under a pixel, and one near 0
# (1e-300) became 0 in float32, so its 1/s sampling grid was NaN and the curves NaN
Factor = Annotated[float, Field(ge=1 / 64, le=64, allow_inf_nan=False)]


class TransformsRequest(BaseModel):
    """The magnitudes to measure per family (docs/invariance.md defines each transform); a
    family left out is not measured. Translations are whole pixels (JSON integers)."""

    model_config = ConfigDict(extra="forbid")
    translate: Annotated[list[Pixels], Magnitudes] | None = None
    rotate: Annotated[list[Degrees], Magnitudes] | None = None
    scale: Annotated[list[Factor], Magnitudes] | None = None


class InvarianceJobRequest(BaseModel):
    """How much each layer's maps change when the inputs are translated, rotated or scaled;
    `source`, `inputs` and `layers` as in a feature-map job."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["invariance"]
    name: Name = ""
    source: CheckpointSource
    inputs: InputsRef
    layers: Layers = None
    transforms: TransformsRequest
    device: Device = "auto"
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    timeout: Timeout = None
    priority: Priority = DEFAULT_PRIORITY


class EvaluateJobRequest(BaseModel):
    """Score a model on inputs: loss, accuracy, confusion matrix and per-class precision and
    recall where the inputs have labels, and every input's top-k classes (GET
    /v1/jobs/{id}/predictions). `source` and `inputs` as in a feature-map job; without
    `indices` every input of the split (or of the upload) is scored."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["evaluate"]
    name: Name = ""
    source: CheckpointSource
    inputs: InputsRef
    top_k: Annotated[int, Field(ge=1, le=100)] = 5
    device: Device = "auto"
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    timeout: Timeout = None
    priority: Priority = DEFAULT_PRIORITY


class ExportJobRequest(BaseModel):
    """Export a model (`source` as in a feature-map job) to ONNX or TorchScript with a dynamic
    batch dimension; the worker runs the exported file (onnxruntime, or torch.jit.load) on a
    fixed batch and records the largest absolute difference from PyTorch."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["export"]
    name: Name = ""
    source: CheckpointSource
    format: Literal["onnx", "torchscript"] = "onnx"
    opset: Annotated[int, Field(ge=13, le=20)] = 17
    device: Device = "cpu"
    max_attempts: Annotated[int, Field(ge=1, le=20)] | None = None
    timeout: Timeout = None
    priority: Priority = DEFAULT_PRIORITY


# the requests whose model and inputs are resolved the same way (api/feature_maps.py)
SourcedRequest = FeatureMapsJobRequest | InvarianceJobRequest | EvaluateJobRequest
JobRequest = Annotated[TrainJobRequest | FeatureMapsJobRequest | InvarianceJobRequest
                       | EvaluateJobRequest | ExportJobRequest, Field(discriminator="kind")]


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
    indices: Indices
    count: int


class UploadedInputs(BaseModel):
    input_id: str
    format: str  # npy, png or jpeg
    indices: Indices
    count: int


class FeatureMapPlan(BaseModel):
    source: PlanSource
    inputs: DatasetInputs | UploadedInputs
    layers: list[str]  # layer names, in model order
    estimated_bytes: int
    estimated_bytes_unpooled: int


TRANSFORM_FAMILIES = ("translate", "rotate", "scale")


class InvariancePlan(BaseModel):
    """What the API resolved for an invariance job, in its summary under "invariance"."""

    source: PlanSource
    inputs: DatasetInputs | UploadedInputs
    layers: list[str]  # layer names, in model order
    # family -> magnitudes, ascending; only the families asked for
    transforms: dict[str, list[int | float]]  # translations in whole pixels
    forward_passes: int  # per input: the original and every transformed copy


class EvaluatePlan(BaseModel):
    """What the API resolved for an evaluate job, in its summary under "evaluate"."""

    source: PlanSource
    inputs: DatasetInputs | UploadedInputs
    classes: int  # the model's output size
    top_k: int  # min(top_k asked, classes)


class ExportPlan(BaseModel):
    """What the API resolved for an export job, in its summary under "export"."""

    source: PlanSource
    format: Literal["onnx", "torchscript"]
    filename: str  # model.onnx or model.pt


class InitPlan(BaseModel):
    """What the API resolved for a train job's `init`, in its summary under "init"."""

    source: TrainJobSource | UploadedCheckpointSource
    # continued: epochs numbered on from `epoch`, the optimizer state restored; else 0
    epoch: int
    continued: bool = False
    loaded: list[str]  # tensor names taken from the source
    skipped: list[str]  # tensor names left as seeded (strict: false)
