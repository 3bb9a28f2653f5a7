"""Response schemas (requests live in convoy.jobspec, shared with the worker)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from convoy.jobspec import EvaluatePlan, ExportPlan, FeatureMapPlan, InitPlan, InvariancePlan


class _Stored(BaseModel):
    """A dict the API or a worker stored, typed; extra keys are kept. Routes answer these with
    exclude_unset, so an optional field that was not stored is left out, not sent as null."""

    model_config = ConfigDict(extra="allow")


class ValidationIssue(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every error body: `detail` is a message, or for a 422 the list of what is wrong where."""

    detail: str | list[ValidationIssue]


class ReadyChecks(BaseModel):
    database: str = Field(description="`ok` or `error: <reason>`")
    broker: str = Field(description="`ok` or `error: <reason>`")
    artifacts: str = Field(description="`ok` or `error: <reason>` naming the artifact store "
                                       "(a probe object written and deleted)")


class ReadyOut(BaseModel):
    status: Literal["ready", "not ready"]
    checks: ReadyChecks


class _LayerFields(_Stored):
    """The fields of a layer row, top-level or inside a residual block."""

    index: int
    type: str
    input_shape: list[int]
    output_shape: list[int]
    params: int
    receptive_field: list[int]
    jump: list[int]
    flops: int
    fc_equivalent_params: int | None = None
    name: str | None = Field(None, description="feature-map jobs: the layer's name")


class LayerRow(_LayerFields):
    """One layer of a model summary; receptive_field and jump are [height, width]."""

    layers: list[InnerLayerRow] | None = Field(
        None, description="a residual block: its inner layers (named `{block}/{index}-{type}`, "
                          "e.g. `3-residual/1-conv2d`)")
    shortcut: Shortcut | None = Field(None, description="a residual block: its shortcut")


class InnerLayerRow(_LayerFields):
    """One layer inside a residual block (its index is its place in the block)."""


class Shortcut(_Stored):
    """`identity`, or `projection`: a 1x1 convolution with `stride` (and batch norm when
    `batchnorm`) of `params` parameters."""

    type: Literal["identity", "projection"]
    stride: list[int] | None = None
    batchnorm: bool | None = None
    params: int | None = None


class FullyConnectedEquivalent(BaseModel):
    input_features: int
    units: int
    params: int


class ModelSummary(_Stored):
    """What POST /v1/models/summary answers, and a job's `summary` (a feature-map job's adds
    `model` and `feature_maps`, its plan)."""

    input_shape: list[int]
    num_classes: int | None
    layers: list[LayerRow]
    output_shape: list[int]
    total_params: int
    total_flops: int
    fully_connected_equivalent: FullyConnectedEquivalent
    activation_bytes_per_sample: int
    model: dict[str, Any] | None = Field(None, description="feature-map and invariance jobs: "
                                                           "the model spec")
    feature_maps: FeatureMapPlan | None = None
    invariance: InvariancePlan | None = None
    evaluate: EvaluatePlan | None = None
    export: ExportPlan | None = None
    init: InitPlan | None = Field(None, description="a train job's `init`: the checkpoint it "
                                                    "starts from, the tensors loaded and "
                                                    "skipped")


class ClassScore(BaseModel):
    precision: float | None = Field(description="null when nothing was predicted as it")
    recall: float | None = Field(description="null when no input has it as its label")
    support: int = Field(description="inputs labelled with it")


class EvaluateResult(_Stored):
    """An evaluate job's result (its per-input predictions: GET /v1/jobs/{id}/predictions)."""

    inputs: int
    top_k: int
    classes: int
    labelled: bool
    loss: float | None = None
    accuracy: float | None = None
    top_k_accuracy: float | None = None
    confusion: list[list[int]] | None = Field(
        None, description="confusion[label][predicted] counts (classes <= 100)")
    per_class: list[ClassScore] | None = None
    device: str | None = None
    images_per_second: float | None = None


class ExportResult(_Stored):
    """An export job's result (the file: GET /v1/jobs/{id}/export)."""

    format: str
    max_abs_diff: float = Field(description="largest |exported - PyTorch| over the check "
                                            "batch's outputs")
    check_batch: int | None = None
    batch_sizes_checked: list[int] | None = None
    bytes: int | None = None
    sha256: str | None = None
    opset: int | None = None


class TrainResult(_Stored):
    """A train job's result."""

    epochs_done: int | None = None
    steps: int | None = None
    val_accuracy: float | None = None
    val_loss: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    device: str | None = None
    resumed_from_epoch: int | None = None
    # the checkpoint cadence the job ran with (its request's, else the worker's default)
    checkpoint_every: dict[str, float] | None = None


class FeatureMapsResult(_Stored):
    """A feature-map job's result."""

    layers: list[str]
    images: int
    dtype: str | None = None
    pool: dict[str, Any] | None = None
    device: str | None = None
    bytes_stored: int | None = None
    bytes_unpooled: int | None = None
    artifacts: int | None = None
    artifact_bytes: int | None = None
    timings: dict[str, float] | None = None
    images_per_second: float | None = None


class LayerCurvePoint(BaseModel):
    magnitude: int | float = Field(description="pixels, degrees or the scale factor")
    cosine: float = Field(description="mean cos(φ(x), φ(Tx)) over the inputs")
    distance: float | None = Field(description="mean ‖φ(x) − φ(Tx)‖ / mean ‖φ(x) − φ(x′)‖; "
                                               "null when fewer than two different inputs")


class OutputCurvePoint(BaseModel):
    magnitude: int | float
    agreement: float = Field(description="fraction of inputs whose argmax class is unchanged")
    true_class_probability: float | None = Field(description="mean softmax probability of the "
                                                             "label; null without labels")


Curves = dict[Literal["translate", "rotate", "scale"], list[LayerCurvePoint]]
OutputCurves = dict[Literal["translate", "rotate", "scale"], list[OutputCurvePoint]]


class InvarianceLayer(BaseModel):
    name: str
    index: int
    type: str
    curves: Curves


class InvarianceResult(_Stored):
    """An invariance job's result (GET /v1/jobs/{id}/invariance answers its curves)."""

    layers: list[InvarianceLayer]
    output: OutputCurves | None
    original: dict[str, float] | None = None
    images: int | None = None
    transforms: dict[str, list[int | float]] | None = None
    device: str | None = None
    images_through_model: int | None = None
    timings: dict[str, float] | None = None
    images_per_second: float | None = None


class InvarianceOut(BaseModel):
    """Per layer, how much its maps change against each transform's magnitude; empty until
    the job has succeeded (`state` says where it is)."""

    job_id: str
    state: str
    layers: list[InvarianceLayer]
    output: OutputCurves | None = Field(description="the model's output, when it is a "
                                                    "classifier's [classes]")
    original: dict[str, float] | None = Field(description="accuracy and true class probability "
                                                          "on the untransformed inputs")
    images: int | None
    transforms: dict[str, list[int | float]] | None


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
    # Typed when the stored row fits (every row the API wrote does); a row that does not (an
    # older or damaged one) is still answered as it is, never a 500.
    summary: Annotated[ModelSummary | dict[str, Any], Field(union_mode="left_to_right")] | None
    # a feature-map job's result names its layers; TrainResult's fields are all optional
    result: Annotated[FeatureMapsResult | InvarianceResult | EvaluateResult | ExportResult
                      | TrainResult | dict[str, Any],
                      Field(union_mode="left_to_right")] | None
    request: dict[str, Any]
    # running time allowed across attempts, seconds (None for jobs from before it existed)
    timeout_seconds: float | None = None
    waiting_reason: str | None = Field(
        None, description="a queued job that cannot start now says why: no live worker reads "
                          "its queue (a `cuda` job with no GPU worker), or its tenant is at "
                          "its running limit; null when nothing holds it up. Computed by the "
                          "GET routes (the answer to a submission leaves it null)")
    # the sweep this job is a trial of (None for a job submitted alone)
    sweep_id: str | None = None


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
    classes: list[str] | None = Field(default=None, description=(
        "image-folder datasets: the class folder names; label i is classes[i]"))
    split: dict[str, int] | None = Field(default=None, description=(
        "image-folder datasets with a val/ or test/ folder: samples per split (train, val, "
        "all); otherwise 20% of each class is held out for validation"))


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
    scopes: list[Literal["metrics"]] = Field(
        default_factory=list, max_length=4,
        description="extra rights of a non-admin token: `metrics` may scrape /metrics")


class TokenOut(BaseModel):
    id: str
    tenant: str
    name: str
    is_admin: bool
    scopes: list[str] = Field(default_factory=list)
    created_at: datetime
    revoked_at: datetime | None
    token: str | None = None


class ChannelStats(BaseModel):
    """Per channel, over every input and position of the stored (pooled) maps."""

    model_config = ConfigDict(extra="allow")

    mean: list[float]
    min: list[float]
    max: list[float]
    zero_fraction: list[float]


class FeatureMapLayer(BaseModel):
    """One captured layer; `stats` are per-channel statistics of the stored (pooled) maps."""

    name: str
    index: int
    type: str
    shape: list[int]
    dtype: str
    bytes: int
    file_bytes: int
    sha256: str
    unpooled_shape: list[int] | None = None
    has_argmax: bool
    stats: ChannelStats


class FeatureMapList(BaseModel):
    job_id: str
    state: str
    layers: list[FeatureMapLayer]
    images: int | None
    pool: dict[str, Any] | None
    bytes_stored: int | None
    bytes_unpooled: int | None


class FeatureMapValues(BaseModel):
    """A layer's maps as JSON (`format=json`): `values` nests as `shape` says."""

    name: str
    array: Literal["maps", "argmax"]
    image: int | None
    shape: list[int]
    dtype: str
    values: list[Any]


BINARY = {"schema": {"type": "string", "format": "binary"}}


class TokenRevokedOut(TokenOut):
    """The answer to DELETE /v1/tokens/{id}: the token, and whether it was the caller's own."""

    revoked_self: bool = Field(description="true when the token revoked is the one this "
                                           "request was made with: it no longer authenticates")
    message: str


class AttemptOut(BaseModel):
    """One claim of a job by a worker. `outcome`: succeeded, failed, canceled, released
    (handed back by a worker shutting down), lost (its worker went away), lease_expired
    (the reconciler took it back), store_error; null while it runs."""

    attempt: int
    worker_id: str
    device: str | None
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None
    error: str | None


class WorkerOut(BaseModel):
    id: str
    host: str
    pid: int | None
    devices: list[str]
    queues: list[str]
    state: Literal["idle", "busy", "stopping"]
    current_job: str | None
    started_at: datetime
    last_seen: datetime


class QueueOut(BaseModel):
    name: str
    workers: int = Field(description="live workers reading it")
    queued: int = Field(description="queued jobs whose messages go to it")


class FleetOut(BaseModel):
    """What the dashboard's fleet page shows: live workers, the queues, jobs by state."""

    workers: list[WorkerOut]
    queues: list[QueueOut]
    jobs: dict[str, int]
    worker_seen_seconds: float


WebhookEvent = Literal["job.succeeded", "job.failed", "job.canceled"]


class WebhookIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=8, max_length=2048, pattern=r"^https?://[^\s]+$")]
    events: Annotated[list[WebhookEvent], Field(min_length=1, max_length=3)]


class WebhookOut(BaseModel):
    id: str
    url: str
    events: list[str]
    created_at: datetime
    disabled_at: datetime | None
    disabled_reason: str | None
    secret: str | None = Field(None, description="the `whsec_` signing secret: only in the "
                                                 "answers to create and rotate")


class WebhookAttemptOut(BaseModel):
    attempt: int
    at: datetime
    status: int | None
    response: str | None
    error: str | None
    duration_seconds: float


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="the `webhook-id` header of every attempt")
    event: str
    job_id: str
    state: Literal["pending", "succeeded", "failed", "canceled"]
    attempts: list[WebhookAttemptOut]
    next_at: datetime | None
    created_at: datetime
    finished_at: datetime | None


class UsageOut(BaseModel):
    """What a tenant holds in the artifact store (the storage quota counts `bytes`)."""

    bytes: int = Field(description="artifact_bytes + upload_bytes")
    artifact_bytes: int = Field(description="files its jobs wrote (checkpoints, maps...)")
    upload_bytes: int = Field(description="datasets, checkpoints and inputs it uploaded")
    jobs: int
    artifacts: int
    uploads: int
    limit_bytes: int | None = Field(description="max_storage_bytes_per_tenant; null: none")


class ClassProbability(BaseModel):
    class_: int = Field(alias="class")
    probability: float

    model_config = ConfigDict(populate_by_name=True)


class Prediction(BaseModel):
    index: int = Field(description="the input's index in its split (or upload)")
    label: int | None = Field(description="its label; null for uploaded inputs")
    top: list[ClassProbability] = Field(description="the top-k classes, most probable first")


class PredictionsOut(BaseModel):
    """A page of an evaluate job's predictions; empty until it has succeeded."""

    job_id: str
    state: str
    total: int
    offset: int
    items: list[Prediction]
    next_offset: int | None
