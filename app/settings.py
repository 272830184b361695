"""One settings class for the API, the CLI, the migrations and (later) the worker.

Read once per process with `get_settings()` and passed around explicitly; tests build their own
`Settings(...)` instead of patching the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
# The pretrained built-in model (tuneqdm pretrain), part of a checkout, not of the wheel.
BUILTIN_MODEL = Path(__file__).resolve().parent.parent / "models" / "fashion-sd"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEQDM_", extra="ignore")

    env: Literal["development", "production"] = "development"

    # Embedded mode: everything lives under one data directory, no servers needed.
    data_dir: Path = Path("var")
    database_url: str | None = None  # default: sqlite:///<data_dir>/tuneqdm.sqlite
    broker_url: str | None = None  # default: sqla+sqlite:///<abs data_dir>/broker.sqlite
    storage_dir: Path | None = None  # default: <data_dir>/files

    # Where photos, checkpoints, adapters, exports and images are stored (app/storage.py):
    # "local", the directory above (every API and worker process must see the same one), or
    # "s3", one bucket of an S3-compatible store (AWS S3, MinIO, SeaweedFS) that processes on
    # different machines share. Unset credentials and region: boto3's own (AWS_* variables,
    # an instance role).
    storage_backend: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None  # unset: AWS S3
    s3_bucket: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str | None = None
    # Downloads (adapters, exports, images): false streams them through the API; true answers
    # 307 to a presigned URL of the store valid for download_redirect_expiry_s (s3 only; the
    # local backend always streams), so large files do not pass through the API.
    download_redirect: bool = False
    download_redirect_expiry_s: float = Field(default=300.0, gt=0, le=7 * 24 * 3600)
    # Worker-local folder for files on their way from and to the s3 backend (photos of the
    # running fine-tune, its checkpoint, an adapter being loaded, outputs before upload);
    # default: <data_dir>/staging. Not a shared folder: each worker machine has its own.
    staging_dir: Path | None = None

    # The base model this deployment serves; adapters trained on another base are refused.
    base_model: str = "tuneqdm/fashion-sd"

    # Upload limits for POST /v1/finetunes.
    min_images: int = Field(default=1, ge=1)
    max_images: int = Field(default=20, ge=1)
    max_image_bytes: int = Field(default=10 * MiB, ge=1)
    max_image_pixels: int = Field(default=4096 * 4096, ge=1)
    # Photos given as `image_urls` are fetched by the API while the request waits (app/
    # image_urls.py): all the URLs of one request within this many seconds together.
    image_url_timeout_s: float = Field(default=30.0, gt=0)
    # Whole request body cap; a multipart upload of max_images files plus form fields fits in it.
    max_request_bytes: int = Field(default=220 * MiB, ge=1)

    # Largest adapter file POST /v1/adapters accepts. An adapter holds only scales (a few
    # MiB for SD 1.x at 8 intervals), so this bounds a hostile upload, not a real one.
    max_adapter_bytes: int = Field(default=64 * MiB, ge=1)

    max_prompt_chars: int = Field(default=500, ge=1)
    require_identifier_token: bool = True

    # Generation limits.
    max_num_images: int = Field(default=4, ge=1)
    max_generation_steps: int = Field(default=150, ge=1)
    # Image sides (fine-tune resolution, generation width/height) are bounded relative to the
    # base's native size (app/bases.py): cost and memory grow with the square of the side
    # (attention with its fourth power), and far from its native size a base makes no sense.
    min_size_factor: float = Field(default=0.5, gt=0, le=1)
    max_size_factor: float = Field(default=2.0, ge=1, le=16)
    # Compute budgets checked at submit (app/budget.py), in native-size units, so one number
    # means the same on every base: fine-tune training samples at the native size
    # (steps × batch × (1 + prior) × pixels / native pixels; the default job is 400), and
    # generation images × steps at the native size (the default request is 30).
    max_finetune_cost: float = Field(default=10_000, gt=0)
    max_generation_cost: float = Field(default=1_000, gt=0)
    # Wall-clock bound of one job from its first start, stored on the row at submit and
    # enforced by the worker: a job that passes it fails and frees its worker.
    finetune_time_limit_s: float = Field(default=3600.0, gt=0)
    generation_time_limit_s: float = Field(default=600.0, gt=0)

    # Webhooks to loopback/private/link-local hosts are a server-side request forgery risk.
    allow_private_webhooks: bool = False
    # Ports a webhook_url may name (JSON list, e.g. [443, 8443]); other ports reach services that
    # were never meant to receive webhooks (SSRF). An empty list allows any port.
    webhook_ports: list[int] = [80, 443]
    # How long an Idempotency-Key keeps answering with its first job; after that it is free.
    idempotency_ttl_s: float = Field(default=24 * 3600.0, gt=0)

    # Stored subject photos are downscaled so their longer side is at most this many times the
    # largest training resolution (TUNEQDM_MAX_IMAGE_SIDE): enough for a random crop, and a
    # 4096² upload does not cost 26 MiB of disk. JPEG quality of the stored copy (95: no
    # artefact a fine-tune could learn).
    stored_photo_scale: float = Field(default=2.0, ge=1.0)
    stored_photo_quality: int = Field(default=95, ge=50, le=100)
    # Threads that decode and re-encode uploaded photos, shared by every request of this API
    # process: image work is CPU-bound, so more threads than cores only add latency; and a
    # tenant may use at most this many of them at once, so one tenant's burst of uploads
    # cannot queue every other tenant's upload behind it.
    image_workers: int = Field(default=2, ge=1)
    image_workers_per_tenant: int = Field(default=1, ge=1)

    # Requests of one API key that run at once in one API process (0: no cap); the others wait
    # without holding a thread, so a client sending fifty at a time cannot take every thread of
    # the request pool (40) from the other tenants.
    requests_per_key: int = Field(default=8, ge=0)

    # Database connection pool of each API process (SQLAlchemy QueuePool). A request that waits
    # longer than db_pool_timeout_s for a connection answers 503 with Retry-After.
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_pool_timeout_s: float = Field(default=10.0, gt=0)

    # Per-tenant limits (0: unlimited); `tuneqdm-admin tenants limits NAME` overrides them for
    # one tenant. Requests over a limit answer 429 with Retry-After and the limit's name.
    # Requests per minute and API key, counted in the database, so every API replica shares
    # one count and the embedded mode (no Redis) works the same way.
    tenant_rpm: int = Field(default=600, ge=0)
    # Queued + running fine-tunes and generations together.
    tenant_active_jobs: int = Field(default=100, ge=0)
    # Photos, adapters, exports, progress samples and generated images together.
    tenant_stored_bytes: int = Field(default=5 * 1024 * MiB, ge=0)
    # Export variants (format, rank, interval) stored per tenant, over all its adapters: a
    # merged export of an SD 1.x adapter is a whole float UNet, so this bounds their number
    # (their bytes count in tenant_stored_bytes too).
    tenant_exports: int = Field(default=20, ge=0)

    # Retention of people's data (docs/api.md, "What is kept"). Subject photos are deleted this
    # many seconds after their fine-tune ends (0: as soon as it ends); generations (rows,
    # prompts, images) this many seconds after they end (0: kept until deleted).
    photo_retention_s: float = Field(default=0.0, ge=0)
    generation_retention_s: float = Field(default=7 * 24 * 3600.0, ge=0)
    # How often each API process runs the retention sweep (0: never; run
    # `tuneqdm-admin sweep` from cron instead).
    retention_sweep_every_s: float = Field(default=300.0, ge=0)

    # Logs: JSON lines on stderr (false: plain text for a terminal).
    log_json: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    max_page_size: int = Field(default=100, ge=1)
    # Largest LoRA rank an export may ask for: bounds the worker's SVD time and the file (a
    # rank-r LoRA of the SD 1.x UNet takes r × 4.2 MB in float32; full rank there is 1280).
    max_export_rank: int = Field(default=128, ge=1)
    # Publishing to the broker must not hang a request when the broker is down.
    broker_timeout_s: float = Field(default=3.0, gt=0)

    # Signs webhooks: each tenant's secret is derived from secret_key, the tenant id and the
    # tenant's secret version (app.webhooks.tenant_webhook_secret), so no secret is stored in
    # the database. Production refuses to run without one.
    secret_key: str | None = None

    # --- Worker (worker/): the one quantized base each worker process serves. ---
    # Model folder, hub id, or one .safetensors/.ckpt checkpoint; default: the built-in
    # pretrained model shipped in models/fashion-sd (or, where that folder is absent, a random
    # tiny model built into <data_dir>/models/tiny-sd on first start).
    model: str | None = None
    # A single-file checkpoint holds weights only: the diffusers folder or hub id whose configs,
    # tokenizer and scheduler it is read with. Unset, diffusers infers the hub repository from
    # the checkpoint's keys (needs the hub, or that repository in the local hub cache).
    # Required for a FLUX/SD3 transformer file: it also gives the VAE and text encoders.
    single_file_config: str | None = None
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    # How the base UNet holds its frozen weights: "packed" keeps only the integer codes and
    # dequantizes per layer on every pass (least memory); "resident" also keeps one dequantized
    # copy on the device (bf16/fp16 on CUDA, fp32 on CPU), shared by every job: faster steps
    # and sampling for ~2 bytes a weight more on a GPU (docs/method.md "Storage modes").
    storage_mode: Literal["packed", "resident"] = "packed"
    # A FLUX or SD3 base's T5 encoder as 8-bit codes (unset: float; docs/settings.md).
    text_encoder_bits: int | None = None
    # CPU threads torch may use (0: torch's default, one per core). On a CPU shared with other
    # processes 1 avoids oversubscription, which slows training down by up to 10x.
    torch_threads: int = Field(default=0, ge=0)
    # Bit width of the worker's base; fine-tunes asking for other bits fail with a message.
    # (an int checked below: a Literal[4, 8] refuses the string "4" from the environment)
    bits: int = 4
    quant_cache_dir: Path | None = None  # default: <data_dir>/cache
    # Lease of a running job: renewed every heartbeat_s; a job whose heartbeat is older than
    # stale_after_s is taken over by another worker (its own worker died).
    heartbeat_s: float = Field(default=5.0, gt=0)
    stale_after_s: float = Field(default=60.0, gt=0)
    sweep_every_s: float = Field(default=30.0, gt=0)
    # A claim counts an attempt; the claim after the last allowed one fails the job with the
    # cause, so a job that kills its worker (out of memory, a driver fault) cannot loop forever.
    max_attempts: int = Field(default=3, ge=1)
    # The sweep also re-sends a message for queued jobs older than this when the queue holds
    # fewer messages than there are queued jobs (a publish lost between commit and send).
    requeue_after_s: float = Field(default=60.0, gt=0)
    # Watchdog: a job that reports no progress for this long stops renewing its lease; its
    # worker gives the job up for a retry and restarts its process.
    progress_timeout_s: float = Field(default=600.0, gt=0)
    # A task that cannot reach the database retries after this delay, doubling each time.
    db_retry_s: float = Field(default=2.0, gt=0)
    # Orphan-file collector: removes files that no row owns, at most this often, and only files
    # older than collect_after_s (a file being published is younger).
    collect_every_s: float = Field(default=3600.0, gt=0)
    collect_after_s: float = Field(default=3600.0, ge=0)
    # Generations of different adapters that share steps/size/scheduler run in one loop.
    generation_batch_size: int = Field(default=8, ge=1)
    # Fine-tunes that share the base, method, resolution and precision train in one loop, each
    # with its own adapter (worker/cotrain.py); 1 trains each alone. 4: on the CPU benchmark
    # (docs/benchmarks.md) K = 4 gave 1.8x the fine-tunes per hour for 1.3x the memory, while
    # each job's own steps took 2.2x as long; more raises throughput further but makes every
    # member wait longer and lets one shared-step failure touch more jobs.
    cotrain_max: int = Field(default=4, ge=1)
    # Autocast dtype of sampling: half precision halves activation traffic on a GPU; "auto" is
    # bf16 on CUDA (fp16 without bf16) and fp32 on CPU, where 16-bit math is slower.
    generation_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    adapter_cache_size: int = Field(default=32, ge=1)
    # Sampler steps of a fine-tune's progress images (params.validation_prompts): few, since
    # they show the trend, not a final image; counted in TUNEQDM_MAX_FINETUNE_COST at submit.
    sample_steps: int = Field(default=20, ge=1, le=150)
    # Webhook delivery (worker/webhooks.py): one attempt, connection to last byte, is cut at
    # webhook_timeout_s, so a slow receiver holds a sender no longer than that; retried with
    # exponential backoff on network errors, timeouts, 429 and 5xx, then marked failed.
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_max_retries: int = Field(default=8, ge=0)
    webhook_backoff_s: float = Field(default=2.0, gt=0)
    # A job that asked for `progress` webhooks gets at most one per this many seconds (its
    # progress is written about every second); the final state's webhook carries the last
    # step's progress in any case.
    webhook_progress_every_s: float = Field(default=10.0, ge=0)
    # How often a worker refreshes its last_seen_at in the bases registry (GET /v1/bases).
    base_seen_every_s: float = Field(default=30.0, gt=0)
    # Deliveries one worker process sends at once from its sweep (slow receivers in parallel).
    webhook_senders: int = Field(default=4, ge=1)
    # After `tuneqdm-admin tenants rotate-webhook-secret`, webhooks carry signatures with the old
    # and the new secret for this long, so receivers can switch without losing a webhook.
    webhook_secret_overlap_s: float = Field(default=24 * 3600.0, ge=0)
    # Port on which each worker process serves its own Prometheus metrics (worker/metrics.py:
    # job outcomes, attempts, queue wait, timings, base load, GPU memory); unset: not served.
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # Where set, a worker loads its base as soon as it starts (not at its first job) and creates
    # this file once the base is loaded and registered; a container health check tests it.
    worker_ready_file: Path | None = None
    # Polling interval of kombu's SQLAlchemy transport (the embedded broker).
    broker_poll_s: float = Field(default=0.5, gt=0)

    @field_validator("bits")
    @classmethod
    def _known_bits(cls, value: int) -> int:
        if value not in (4, 8):
            raise ValueError(f"TUNEQDM_BITS must be 4 or 8, got {value}")
        return value

    @field_validator("text_encoder_bits")
    @classmethod
    def _known_text_bits(cls, value: int | None) -> int | None:
        if value is not None and value != 8:
            raise ValueError(f"TUNEQDM_TEXT_ENCODER_BITS must be 8 or unset, got {value}")
        return value

    @field_validator("webhook_ports")
    @classmethod
    def _valid_ports(cls, value: list[int]) -> list[int]:
        bad = [p for p in value if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"TUNEQDM_WEBHOOK_PORTS has invalid ports {bad}; use 1-65535")
        return value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self) -> Settings:
        # Otherwise a live worker's job would be taken over between two of its heartbeats.
        if self.stale_after_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"TUNEQDM_STALE_AFTER_S ({self.stale_after_s}) must be at least twice "
                f"TUNEQDM_HEARTBEAT_S ({self.heartbeat_s})"
            )
        return self

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> Settings:
        if self.storage_backend == "s3" and not self.s3_bucket:
            raise ValueError("TUNEQDM_STORAGE_BACKEND=s3 needs TUNEQDM_S3_BUCKET")
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env != "production":
            return self
        problems = []
        if self.database_url is None or self.database_url.startswith("sqlite"):
            problems.append("set TUNEQDM_DATABASE_URL to a PostgreSQL URL")
        if self.broker_url is None or self.broker_url.startswith("sqla+"):
            problems.append("set TUNEQDM_BROKER_URL to a Redis URL")
        if self.allow_private_webhooks:
            problems.append("unset TUNEQDM_ALLOW_PRIVATE_WEBHOOKS")
        if not self.secret_key or len(self.secret_key) < 32:
            problems.append("set TUNEQDM_SECRET_KEY to a random string of 32+ characters")
        if problems:
            raise ValueError(
                "TUNEQDM_ENV=production refuses development defaults: " + "; ".join(problems)
            )
        return self

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'tuneqdm.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "files").resolve()

    @property
    def resolved_staging_dir(self) -> Path:
        return (self.staging_dir or self.data_dir / "staging").resolve()

    @property
    def resolved_secret_key(self) -> str:
        # Development only (production refuses a missing key): stable, so signatures verify.
        return self.secret_key or "tuneqdm-development-secret-key-not-for-production"

    @property
    def default_model_dir(self) -> Path:
        if (BUILTIN_MODEL / "model_index.json").is_file():
            return BUILTIN_MODEL
        return (self.data_dir / "models" / "tiny-sd").resolve()

    @property
    def resolved_model(self) -> str:
        return self.model or str(self.default_model_dir)

    @property
    def resolved_quant_cache_dir(self) -> Path:
        return (self.quant_cache_dir or self.data_dir / "cache").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
