"""One settings object for API, worker and CLI alike (env prefix CONVOY_).

Defaults describe the embedded mode: everything lives under CONVOY_HOME.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CONVOY_", extra="ignore")

    env: Literal["development", "production"] = "development"
    home: Path = Path("var")
    host: str = "127.0.0.1"
    port: int = 8000
    database_url: str = ""  # default: SQLite file in home
    broker_url: str = ""  # default: kombu's SQLAlchemy transport over SQLite in home
    # A local folder (default: home/artifacts) or s3://BUCKET/PREFIX (an S3-compatible bucket;
    # credentials and region from the standard AWS variables).
    artifact_root: str = ""
    s3_endpoint_url: str = ""  # a server other than AWS (SeaweedFS, MinIO...)
    # Downloads answer 302 to a presigned URL valid this long, instead of streaming.
    s3_presigned_downloads: bool = False
    s3_presigned_seconds: Annotated[int, Field(ge=1, le=7 * 24 * 3600)] = 300
    # Objects at least this large are written as multipart uploads of parts this size.
    s3_multipart_bytes: Annotated[int, Field(ge=5 * 1024 * 1024)] = 8 * 1024 * 1024
    queue: str = "convoy"
    # Whether `convoy worker` also reads the GPU queue (jobs with device "cuda"); unset: when
    # the worker has a CUDA device. The embedded worker always reads it.
    worker_gpu_queue: bool | None = None
    # The devices this worker owns (jobs with resources.devices > 1 run as that many ranks):
    # a number N (the first N visible GPUs on a GPU host, else N CPU ranks), or GPU indices
    # "0,2,3" / "cuda:1". Unset: every visible GPU, else the host's cores (docs/distributed.md).
    worker_devices: str = ""
    # The most devices one job may ask for (checked at submission); a worker reads the
    # device-count queues up to min(this, the devices it owns).
    max_devices_per_job: Annotated[int, Field(ge=1, le=1024)] = 8
    bootstrap_token: str | None = None
    # A fresh token for the first admin is printed here when no bootstrap token is set.
    token_file: Path | None = None

    # Measured on 2 cores (bench/RESULTS.md): one thread per worker process avoids
    # oversubscription that made a small CNN 50x slower when the other core was busy.
    torch_threads: int = 1
    # pay the first job's one-time costs (imports, torch set-up) when the worker starts
    worker_warm_up: bool = True
    worker_id: str = ""
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    # Queued jobs older than this whose message may have been lost are sent again.
    requeue_after_seconds: float = 30.0
    reconcile_interval_seconds: float = 5.0
    # how often the sweep driver (in the API process) tops up, prunes and ends sweeps
    sweep_interval_seconds: Annotated[float, Field(gt=0)] = 2.0
    # A worker retries its epoch and outcome writes this long while the database is down.
    db_retry_seconds: float = 300.0
    # Longer than any job: Redis redelivers unacked messages after this.
    visibility_timeout_seconds: int = 7 * 24 * 3600
    # The embedded broker's poll: a message wakes an idle worker on this machine at once
    # (convoy.brokerwake), so this only bounds the wait when a wake-up is lost (or where no
    # FIFO can be made); an idle worker costs one poll of its queues per interval.
    broker_polling_interval: Annotated[float, Field(gt=0)] = 1.0

    max_attempts: int = 3
    # A pause between committing a checkpoint retention decision and deleting the files it
    # dropped: 0 but in the test that kills a worker in that window.
    checkpoint_prune_delay_seconds: Annotated[float, Field(ge=0)] = 0.0
    # A train job's checkpoint cadence when its request has no `checkpoint_every` (README,
    # "Checkpoint cadence"): at an epoch when this many epochs and seconds have passed since
    # the last checkpoint; the last epoch, a cancel and a warm shutdown always write one.
    checkpoint_every_epochs: Annotated[int, Field(ge=1)] = 1
    checkpoint_min_seconds: Annotated[float, Field(ge=0)] = 10.0
    # A train job records an epoch that writes no checkpoint (its metrics, progress and
    # lease renewal) at most this often; the epochs in between go with the next record, in
    # its one transaction (README, "Checkpoint cadence"). 0: every epoch at its end.
    epoch_record_seconds: Annotated[float, Field(ge=0)] = 0.5
    # A storage error on a worker (full, read-only store) ends the attempt and queues the job
    # again after this many seconds, doubling per attempt up to store_retry_max_seconds.
    store_retry_seconds: Annotated[float, Field(ge=0)] = 10.0
    store_retry_max_seconds: Annotated[float, Field(ge=0)] = 300.0
    max_params: int = 50_000_000
    max_activation_bytes: int = 4 * 1024**3
    max_epochs: int = 1000
    max_batch_size: int = 4096
    max_image_pixels: int = 4096 * 4096
    max_input_side: int = 1024
    max_request_bytes: int = 1024 * 1024
    max_upload_bytes: int = 256 * 1024 * 1024
    # An uploaded .npz's arrays once unpacked (x counted as float32): checked from the archive's
    # and the arrays' headers before anything is decompressed.
    max_dataset_bytes: int = 512 * 1024 * 1024
    # Generated (synthetic) datasets a worker keeps between jobs, by their full reference,
    # least recently used dropped past this many bytes (0: none kept): a sweep's trials
    # share their data, which took 70 ms for 512 small images and seconds for 10,000 scenes.
    dataset_cache_bytes: Annotated[int, Field(ge=0)] = 256 * 1024 * 1024
    # Image-folder archives (.zip, .tar, .tar.gz): most members, most bytes they unpack to
    # (summed, counted while reading: a gzip or zip bomb stops at the cap).
    max_archive_members: Annotated[int, Field(ge=1)] = 200_000
    max_archive_bytes: Annotated[int, Field(ge=1)] = 512 * 1024 * 1024
    max_json_map_values: int = 100_000
    # Enforced when a worker claims a job: past it the job stays queued and its message is
    # sent again after tenant_defer_seconds, so the worker serves other tenants meanwhile.
    max_running_per_tenant: Annotated[int, Field(ge=1)] = 8
    tenant_defer_seconds: Annotated[float, Field(gt=0)] = 5.0
    max_queued_per_tenant: int = 1000
    # Bytes a tenant's artifacts and uploads may hold in the store; past it submissions and
    # uploads answer 413 (None: no limit). GET /v1/usage shows what a tenant holds.
    max_storage_bytes_per_tenant: Annotated[int, Field(ge=0)] | None = None
    max_feature_map_bytes: int = 2 * 1024**3

    # --- idempotency, time and CPU bounds ---
    # How long an Idempotency-Key is remembered (then purged by the reconciler, or replaced
    # when it is seen again after that).
    idempotency_ttl_seconds: Annotated[float, Field(gt=0)] = 24 * 3600.0
    # A train job's estimated work: the model's FLOPs per sample x 3 (forward and backward)
    # x the dataset's samples x epochs. The default is about 15 minutes of one CPU core at
    # the ~11 GFLOP/s a small CNN trains at here (seconds on a GPU: raise it for GPU workers);
    # per-tenant overrides as JSON, e.g. {"research": 1e16}. Admins are not exempt: the
    # limit protects the workers, whoever submits.
    max_job_flops: Annotated[float, Field(gt=0)] = 1e13
    max_job_flops_by_tenant: dict[str, float] = {}
    # A job's running time (every attempt's, from claim to its end; not time queued): the
    # default when the request gives no `timeout`, and the most a request may ask for.
    job_timeout_seconds: Annotated[float, Field(gt=0)] = 24 * 3600.0
    max_job_timeout_seconds: Annotated[float, Field(gt=0)] = 7 * 24 * 3600.0
    # Bounds on a model spec (summary and jobs): number of layers, and the side of any
    # layer's output (padding can grow the maps layer after layer).
    max_model_layers: Annotated[int, Field(ge=1)] = 256
    max_feature_side: Annotated[int, Field(ge=1)] = 8192

    # --- hostile load on the API ---
    # A request waits this long for a pooled database connection, then gets 503 + Retry-After.
    db_pool_timeout_seconds: Annotated[float, Field(gt=0)] = 5.0
    # Token checks: a bad token is remembered this long (no database trip when it comes
    # again). A good one is not cached by default, so a revocation takes effect at once;
    # a value > 0 saves a lookup per request at the price of a revocation taking that long.
    auth_miss_cache_seconds: Annotated[float, Field(ge=0)] = 5.0
    auth_hit_cache_seconds: Annotated[float, Field(ge=0, le=5)] = 0.0
    auth_cache_size: Annotated[int, Field(ge=1)] = 10_000
    # Server-sent event streams: the token (and the job's tenant) is checked again this
    # often, and open streams are capped per tenant and per API process (429 past a cap).
    stream_recheck_seconds: Annotated[float, Field(gt=0)] = 2.0
    max_streams_per_tenant: Annotated[int, Field(ge=1)] = 20
    max_streams_total: Annotated[int, Field(ge=1)] = 200
    # A request waiting on a job (GET /v1/jobs/{id}?wait_seconds=, the event stream) is woken
    # by PostgreSQL's NOTIFY when the job's state changes (api/jobwait.py); on SQLite it
    # re-reads the job's row this often instead.
    wait_poll_seconds: Annotated[float, Field(gt=0)] = 0.05
    # Slow clients (the served uvicorn): a connection must finish sending a request's headers
    # this long after it opened (or after its previous response); idle keep-alive
    # connections close after keep_alive_seconds; past max_connections new connections are
    # closed at once (each costs a file descriptor).
    header_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    keep_alive_seconds: Annotated[int, Field(ge=1)] = 5
    max_connections: Annotated[int, Field(ge=1)] = 2048

    # --- operators: /metrics, webhooks, workers (docs/operations.md) ---
    # /metrics without a token (otherwise an admin token or one with the `metrics` scope).
    metrics_public: bool = False
    # A worker is listed by GET /v1/workers, and counts as reading its queues (a queued
    # job's waiting_reason), while its last report is at most this old. Workers report
    # every heartbeat_seconds.
    worker_seen_seconds: Annotated[float, Field(gt=0)] = 60.0
    # Webhook URLs may reach loopback, private and link-local addresses (checked on the
    # address the host name resolves to when each delivery is sent).
    webhook_allow_private: bool = False
    # The Standard Webhooks retry schedule (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h) is
    # multiplied by this (tests shorten it).
    webhook_retry_scale: Annotated[float, Field(gt=0)] = 1.0
    # How often the API's sender looks for due deliveries; one receiver's answer is awaited
    # at most webhook_timeout_seconds.
    webhook_poll_seconds: Annotated[float, Field(gt=0)] = 1.0
    webhook_timeout_seconds: Annotated[float, Field(gt=0)] = 10.0
    max_webhooks_per_tenant: Annotated[int, Field(ge=1)] = 20

    @model_validator(mode="after")
    def _defaults_from_home(self) -> Settings:
        home = self.home.resolve()
        self.home = home
        if not self.database_url:
            self.database_url = f"sqlite:///{home / 'convoy.db'}"
        if not self.broker_url:
            self.broker_url = f"sqla+sqlite:///{home / 'broker.db'}"
        if not self.artifact_root:
            self.artifact_root = str(home / "artifacts")
        if self.token_file is None:
            self.token_file = home / "admin-token"
        return self

    @property
    def artifacts_in_s3(self) -> bool:
        return self.artifact_root.startswith("s3://")

    @property
    def artifacts_dir(self) -> Path:
        """The local artifact folder (ValueError when the store is a bucket)."""
        if self.artifacts_in_s3:
            raise ValueError(f"the artifact root is a bucket ({self.artifact_root}), not a folder")
        return Path(self.artifact_root)


@lru_cache
def get_settings() -> Settings:
    return Settings()
