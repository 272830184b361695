"""Pydantic schemas of the public API: XCreate (input), XPublic (output), XsPublic (a page).

No FastAPI imports: the worker validates stored params with the same `FinetuneParams`.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app import models

Method = Literal["tuneqdm", "peqa", "full"]
Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
Scheduler = Literal["ddim", "dpmsolver++", "euler"]
ExportFormat = Literal["lora", "merged"]
ExportStatus = Literal["queued", "running", "succeeded", "failed"]

SEED_MAX = 2**32 - 1
# Progress images: at most this many prompts, and at most this many sampling points per job
# (every sample_every steps plus the last step), so the sample list stays one short page.
MAX_VALIDATION_PROMPTS = 4
MAX_SAMPLE_POINTS = 50
# Sampling points of a job when sample_every is not given: a quarter of the steps apart.
DEFAULT_SAMPLE_POINTS = 4


class FinetuneParams(BaseModel):
    """Training parameters; unknown keys are refused so a typo never silently becomes a default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Method = "tuneqdm"
    bits: Literal[4, 8] | None = Field(
        default=None,
        description="Bit width of the quantized base UNet; default: the base's (GET /v1/bases), "
        "the only one its workers serve.",
    )
    intervals: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="Timestep intervals, one scale set each (default 1: more measured no "
        "better on the built-in model; peqa and full use exactly 1).",
    )
    steps: int = Field(default=400, ge=1, le=5000)
    # The core's defaults (tuneqdm_core.finetune.FinetuneConfig): s_out lives on the scale of
    # the base's quantization step, s_in around 1 (docs/method.md).
    lr_s_out: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Learning rate of output scales; default: 2e-3 × the base's median "
        "quantization step (the same relative step at 4 and 8 bits).",
    )
    lr_s_in: float = Field(default=1e-3, gt=0, le=1, description="Learning rate of input scales.")
    lr: float = Field(default=5e-6, gt=0, le=1e-2, description="Learning rate of method=full only.")
    batch_size: int = Field(default=1, ge=1, le=8)
    # Static bounds here; the service fills in and bounds it from the base (app/bases.py).
    resolution: int | None = Field(
        default=None,
        ge=8,
        le=8192,
        multiple_of=8,
        description="Training image side; default: the base's native resolution "
        "(GET /v1/bases), accepted within TUNEQDM_MIN/MAX_SIZE_FACTOR × native.",
    )
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    prior_loss_weight: float = Field(
        default=1.0, ge=0, le=10, description="Used with class_prompt."
    )
    num_class_images: int = Field(default=100, ge=0, le=1000, description="Used with class_prompt.")
    # The core decides these per device (FinetuneConfig.for_device): the API cannot know
    # the worker's device, so null / "auto" are stored and resolved there.
    gradient_checkpointing: bool | None = Field(
        default=None, description="Recompute activations in backward; default: on for CUDA."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        default="auto",
        description="Autocast dtype of training; auto: bf16 on CUDA (fp16 without bf16), "
        "none on CPU.",
    )
    checkpoint_every: int = Field(
        default=100, ge=1, le=5000, description="Steps between checkpoints."
    )
    validation_prompts: list[str] = Field(
        default=[],
        max_length=MAX_VALIDATION_PROMPTS,
        description="Prompts of the progress images (GET /v1/finetunes/{id}/samples): one "
        "image each, every sample_every steps and after the last step; none by default.",
    )
    sample_every: int | None = Field(
        default=None,
        ge=1,
        le=5000,
        description="Steps between progress images; default: a quarter of steps (rounded "
        f"up); at most {MAX_SAMPLE_POINTS} sampling points per job. Only with "
        "validation_prompts.",
    )

    @model_validator(mode="after")
    def _sampling(self) -> FinetuneParams:
        if not self.validation_prompts:
            if self.sample_every is not None:
                raise ValueError("sample_every needs validation_prompts; give at least one")
            return self
        if self.sample_every is None:
            self.sample_every = -(-self.steps // DEFAULT_SAMPLE_POINTS)
        points = sample_points(self.steps, self.sample_every)
        if points > MAX_SAMPLE_POINTS:
            least = -(-self.steps // MAX_SAMPLE_POINTS)
            raise ValueError(
                f"sample_every={self.sample_every} makes {points} sets of progress images over "
                f"{self.steps} steps, above {MAX_SAMPLE_POINTS}; use sample_every >= {least}"
            )
        return self

    @model_validator(mode="after")
    def _intervals_per_method(self) -> FinetuneParams:
        if self.method == "tuneqdm":
            self.intervals = 1 if self.intervals is None else self.intervals
        elif self.intervals not in (None, 1):
            raise ValueError(
                f"method={self.method} trains one scale set, so intervals must be 1 "
                f"(got {self.intervals}); use method=tuneqdm for several intervals"
            )
        else:
            self.intervals = 1
        return self


def sample_points(steps: int, every: int) -> int:
    """How often a job samples: at every multiple of `every` up to `steps`, and at `steps`."""
    return -(-steps // every)


class Progress(BaseModel):
    step: int
    total: int


class WebhookPublic(BaseModel):
    """Delivery state of the job's webhook (null until the job has finished)."""

    id: str = Field(description="The `webhook-id` header of every attempt.")
    event: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None = Field(description="While pending: the next attempt.")
    delivered_at: datetime | None

    @classmethod
    def from_row(cls, row: models.WebhookDelivery | None) -> WebhookPublic | None:
        if row is None:
            return None
        return cls(
            id=row.id,
            event=row.event,
            status=row.status,  # type: ignore[arg-type]
            attempts=row.attempts,
            last_error=row.last_error,
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            delivered_at=row.delivered_at,
        )


class FinetuneLinks(BaseModel):
    self: str
    cancel: str
    adapter: str | None = None


class FinetunePublic(BaseModel):
    id: str
    name: str | None
    status: Status
    instance_prompt: str
    class_prompt: str | None
    token: str
    base_model: str = Field(description="The base it trains on (the `base` field).")
    params: FinetuneParams
    webhook_url: str | None
    webhook: WebhookPublic | None
    num_images: int = Field(description="Photos uploaded (kept even after they are deleted).")
    photos_deleted_at: datetime | None = Field(
        description="When the photos were deleted (after the job ended; see retention)."
    )
    progress: Progress
    loss: float | None
    eta_seconds: float | None = Field(description="Estimated seconds left while running.")
    error: str | None
    adapter_id: str | None
    time_limit_s: float | None = Field(description="Seconds the job may run from its start.")
    group_size: int | None = Field(
        description="While running: how many fine-tunes its worker trains in one loop, this "
        "one included (co-training, TUNEQDM_COTRAIN_MAX); null when it runs alone or is not "
        "running."
    )
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: FinetuneLinks

    @classmethod
    def from_row(cls, job: models.FinetuneJob) -> FinetunePublic:
        adapter_id = job.adapter.id if job.adapter is not None else None
        return cls(
            id=job.id,
            name=job.name,
            status=job.status,  # type: ignore[arg-type]
            instance_prompt=job.instance_prompt,
            class_prompt=job.class_prompt,
            token=job.token,
            base_model=job.base_model,
            params=FinetuneParams.model_validate(job.params),
            webhook_url=job.webhook_url,
            webhook=WebhookPublic.from_row(job.webhook),
            num_images=job.num_images,
            photos_deleted_at=job.photos_deleted_at,
            progress=Progress(step=job.progress_step, total=job.progress_total),
            loss=job.loss,
            eta_seconds=_eta(job),
            error=job.error,
            adapter_id=adapter_id,
            time_limit_s=job.time_limit_s,
            group_size=job.group_size if job.status == "running" else None,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            links=FinetuneLinks(
                self=f"/v1/finetunes/{job.id}",
                cancel=f"/v1/finetunes/{job.id}/cancel",
                adapter=f"/v1/adapters/{adapter_id}" if adapter_id else None,
            ),
        )


def _eta(job: models.FinetuneJob) -> float | None:
    # Linear extrapolation of the steps done so far; good enough for a progress bar.
    if job.status != "running" or job.started_at is None or job.progress_step <= 0:
        return None
    elapsed = (datetime.now(timezone.utc) - job.started_at).total_seconds()
    left = max(job.progress_total - job.progress_step, 0)
    return round(max(elapsed, 0.0) / job.progress_step * left, 1)


class SamplePublic(BaseModel):
    step: int = Field(description="Training step the adapter had reached.")
    prompt_index: int = Field(description="Index into params.validation_prompts.")
    prompt: str
    seed: int = Field(description="The same for a prompt at every step, so images compare.")
    url: str = Field(description="The PNG (same API key).")
    created_at: datetime

    @classmethod
    def from_row(cls, row: models.FinetuneSample) -> SamplePublic:
        return cls(
            step=row.step,
            prompt_index=row.prompt_index,
            prompt=row.prompt,
            seed=row.seed,
            url=f"/v1/finetunes/{row.job_id}/samples/{row.step}/{row.prompt_index}",
            created_at=row.created_at,
        )


class SamplesPublic(BaseModel):
    data: list[SamplePublic] = Field(description="By step, then prompt index.")
    count: int


EventType = Literal[
    "queued",
    "running",
    "released",
    "progress",
    "samples",
    "succeeded",
    "failed",
    "canceled",
    "webhook",
]


class EventPublic(BaseModel):
    type: EventType
    data: dict[str, Any] = Field(description="Fields by type (docs/api.md, Events).")
    created_at: datetime

    @classmethod
    def from_row(cls, row: models.FinetuneEvent) -> EventPublic:
        return cls(type=row.type, data=row.data, created_at=row.created_at)  # type: ignore[arg-type]


class EventsPublic(BaseModel):
    data: list[EventPublic] = Field(description="Oldest first.")
    next_cursor: str = Field(
        description="Pass as cursor to get the events after these (also later, for new ones)."
    )
    has_more: bool = Field(description="More events exist after this page now.")


class FinetunesPublic(BaseModel):
    data: list[FinetunePublic]
    count: int = Field(description="Number of matching jobs across all pages.")


class AdapterLinks(BaseModel):
    self: str
    file: str
    finetune: str | None = None


class AdapterPublic(BaseModel):
    id: str
    name: str | None
    finetune_id: str | None
    method: Method
    bits: int
    intervals: int
    tokens: list[str]
    size_bytes: int
    base_model: str
    base_fingerprint: str
    created_at: datetime
    links: AdapterLinks

    @classmethod
    def from_row(cls, adapter: models.Adapter) -> AdapterPublic:
        return cls(
            id=adapter.id,
            name=adapter.name,
            finetune_id=adapter.finetune_job_id,
            method=adapter.method,  # type: ignore[arg-type]
            bits=adapter.bits,
            intervals=adapter.intervals,
            tokens=list(adapter.tokens),
            size_bytes=adapter.size_bytes,
            base_model=adapter.base_model,
            base_fingerprint=adapter.base_fingerprint,
            created_at=adapter.created_at,
            links=AdapterLinks(
                self=f"/v1/adapters/{adapter.id}",
                file=f"/v1/adapters/{adapter.id}/file",
                finetune=(
                    f"/v1/finetunes/{adapter.finetune_job_id}" if adapter.finetune_job_id else None
                ),
            ),
        )


class AdaptersPublic(BaseModel):
    data: list[AdapterPublic]
    count: int


class ExportCreate(BaseModel):
    """What to export (docs/api.md, "Exports"); the adapter's own bounds (its intervals, the
    service's largest rank) are checked by the service."""

    model_config = ConfigDict(extra="forbid")

    format: ExportFormat = Field(
        description="lora: a LoRA file for diffusers' load_lora_weights; merged: the float "
        "UNet with the adapter written in (one fp16 .safetensors file)."
    )
    rank: int | None = Field(
        default=None, ge=1, description="LoRA rank (required for lora, e.g. 16; unused for merged)."
    )
    # "mean" is also the library's default (tuneqdm_core.export); see docs/library.md.
    interval: str = Field(
        default="mean",
        max_length=8,
        description="Which timestep interval's weights: an index, or 'mean' (time-weighted).",
    )

    @model_validator(mode="after")
    def _rank_for_lora(self) -> ExportCreate:
        if self.format == "lora" and self.rank is None:
            raise ValueError("rank is required for format=lora (e.g. 16)")
        if self.format == "merged" and self.rank is not None:
            raise ValueError("rank applies to format=lora only; leave it out for merged")
        if self.interval != "mean" and not self.interval.isdigit():
            raise ValueError(f"interval must be 'mean' or an index, got {self.interval!r}")
        return self

    @property
    def variant(self) -> str:
        rank = f"-r{self.rank}" if self.rank is not None else ""
        return f"{self.format}{rank}-{self.interval}"


class ExportLinks(BaseModel):
    file: str


class ExportPublic(BaseModel):
    id: str
    adapter_id: str
    format: ExportFormat
    rank: int | None
    interval: str
    status: ExportStatus
    size_bytes: int | None
    relative_error: float | None = Field(
        description="LoRA only: ‖D − B·A‖ / ‖D‖ over all layers (0 at full rank)."
    )
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    links: ExportLinks

    @classmethod
    def from_row(cls, row: models.AdapterExport) -> ExportPublic:
        query = f"format={row.format}&interval={row.interval}"
        if row.rank is not None:
            query += f"&rank={row.rank}"
        return cls(
            id=row.id,
            adapter_id=row.adapter_id,
            format=row.format,  # type: ignore[arg-type]
            rank=row.rank,
            interval=row.interval,
            status=row.status,  # type: ignore[arg-type]
            size_bytes=row.size_bytes,
            relative_error=row.relative_error,
            error=row.error,
            created_at=row.created_at,
            finished_at=row.finished_at,
            links=ExportLinks(file=f"/v1/adapters/{row.adapter_id}/export?{query}"),
        )


class ExportsPublic(BaseModel):
    data: list[ExportPublic]
    count: int


class GenerationCreate(BaseModel):
    """Static bounds here; the tighter, configurable limits are checked by the service."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    adapter_id: str | None = Field(
        default=None, max_length=64, description="Adapter to apply; null uses the plain base model."
    )
    base: str | None = Field(
        default=None,
        max_length=255,
        description="Base to generate with (GET /v1/bases); default: the adapter's base, or "
        "without an adapter the deployment's default base.",
    )
    prompt: str = Field(min_length=1, max_length=10_000)
    negative_prompt: str | None = Field(default=None, max_length=10_000)
    num_images: int = Field(default=1, ge=1, le=64)
    steps: int = Field(default=30, ge=1, le=1000)
    guidance_scale: float = Field(default=7.5, ge=0, le=30)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, description="Image i uses seed + i.")
    width: int | None = Field(
        default=None,
        ge=8,
        le=8192,
        multiple_of=8,
        description="Default: the base's native resolution (GET /v1/bases).",
    )
    height: int | None = Field(
        default=None,
        ge=8,
        le=8192,
        multiple_of=8,
        description="Default: the base's native resolution (GET /v1/bases).",
    )
    scheduler: Scheduler = "ddim"
    webhook_url: str | None = Field(
        default=None, max_length=2048, description="Receives a signed POST when it finishes."
    )


class GeneratedImagePublic(BaseModel):
    index: int
    seed: int
    url: str


class GenerationLinks(BaseModel):
    self: str
    cancel: str
    adapter: str | None = None


class GenerationPublic(BaseModel):
    id: str
    adapter_id: str | None
    base_model: str
    status: Status
    prompt: str
    negative_prompt: str | None
    num_images: int
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    scheduler: Scheduler
    webhook_url: str | None
    webhook: WebhookPublic | None
    error: str | None
    images: list[GeneratedImagePublic]
    time_limit_s: float | None = Field(description="Seconds the job may run from its start.")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: GenerationLinks

    @classmethod
    def from_row(cls, gen: models.GenerationJob) -> GenerationPublic:
        return cls(
            id=gen.id,
            adapter_id=gen.adapter_id,
            base_model=gen.base_model,
            status=gen.status,  # type: ignore[arg-type]
            prompt=gen.prompt,
            negative_prompt=gen.negative_prompt,
            num_images=gen.num_images,
            steps=gen.steps,
            guidance_scale=gen.guidance_scale,
            seed=gen.seed,
            width=gen.width,
            height=gen.height,
            scheduler=gen.scheduler,  # type: ignore[arg-type]
            webhook_url=gen.webhook_url,
            webhook=WebhookPublic.from_row(gen.webhook),
            error=gen.error,
            images=[
                GeneratedImagePublic(
                    index=img.index,
                    seed=img.seed,
                    url=f"/v1/generations/{gen.id}/images/{img.index}",
                )
                for img in gen.images
            ],
            time_limit_s=gen.time_limit_s,
            created_at=gen.created_at,
            updated_at=gen.updated_at,
            started_at=gen.started_at,
            finished_at=gen.finished_at,
            links=GenerationLinks(
                self=f"/v1/generations/{gen.id}",
                cancel=f"/v1/generations/{gen.id}/cancel",
                adapter=f"/v1/adapters/{gen.adapter_id}" if gen.adapter_id else None,
            ),
        )


class SizeRangePublic(BaseModel):
    default: int = Field(description="The native resolution, used when a request omits a size.")
    min: int
    max: int


class BaseWorkerPublic(BaseModel):
    worker: str
    device: str | None
    last_seen_at: datetime
    up: bool = Field(
        description="Seen within 3 × TUNEQDM_BASE_SEEN_EVERY_S (a live worker refreshes "
        "last_seen_at every TUNEQDM_BASE_SEEN_EVERY_S)."
    )


class QueuedPublic(BaseModel):
    finetune: int = Field(description="Fine-tunes of this base waiting for a worker.")
    generation: int = Field(description="Generations of this base waiting for a worker.")


class BasePublic(BaseModel):
    name: str
    source: str = Field(description="Model folder or hub id.")
    native_resolution: int = Field(description="UNet sample size × VAE scale factor, in pixels.")
    sizes: SizeRangePublic = Field(
        description="Accepted fine-tune resolution and generation width/height (multiples of 8)."
    )
    bits: int
    prediction_type: str
    fingerprint: str | None = Field(description="Known once a worker has loaded the base.")
    device: str | None
    storage_mode: str | None
    default: bool = Field(description="The base of requests that name none (TUNEQDM_BASE_MODEL).")
    workers_up: int = Field(description="Workers of this base seen recently (`up`).")
    queued: QueuedPublic
    workers: list[BaseWorkerPublic]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(
        cls,
        row: models.ServedBase,
        sizes: SizeRangePublic,
        *,
        default: bool,
        queued: QueuedPublic,
        up_since: datetime,
    ) -> BasePublic:
        workers = [
            BaseWorkerPublic(
                worker=w.worker,
                device=w.device,
                last_seen_at=w.last_seen_at,
                up=w.last_seen_at >= up_since,
            )
            for w in row.workers
        ]
        return cls(
            name=row.name,
            source=row.source,
            native_resolution=row.native_resolution,
            sizes=sizes,
            bits=row.bits,
            prediction_type=row.prediction_type,
            fingerprint=row.fingerprint,
            device=row.device,
            storage_mode=row.storage_mode,
            default=default,
            workers_up=sum(w.up for w in workers),
            queued=queued,
            workers=workers,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class BasesPublic(BaseModel):
    data: list[BasePublic]
    count: int


class GenerationsPublic(BaseModel):
    data: list[GenerationPublic]
    count: int = Field(description="Number of matching generations across all pages.")


class HealthPublic(BaseModel):
    status: Literal["ok"]
    checks: dict[str, str] = {}
