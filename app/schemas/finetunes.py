"""Fine-tune jobs: their parameters (also validated by the worker) and their state."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app import models
from app.models import Method, Phase, Status, WebhookEvent
from app.outbox import chosen_events
from app.schemas.common import PHASE_DOC, SEED_MAX, WAITING_DOC, WebhookPublic, phase_of

# Progress images: at most this many prompts, and at most this many sampling points per job
# (every sample_every steps plus the last step), so the sample list stays one short page.
MAX_VALIDATION_PROMPTS = 4
MAX_SAMPLE_POINTS = 50
# Sampling points of a job when sample_every is not given: a quarter of the steps apart.
DEFAULT_SAMPLE_POINTS = 4


class FinetuneParams(BaseModel):
    """Training parameters; unknown keys are refused so a typo never silently becomes a default,
    and values are strict: `true` or `"3"` is not a number (lax coercion trained 1 step for
    `steps: true`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

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
    # tuneqdm_core's DEFAULT_STEPS (the API image has no torch; tests/worker/test_options.py
    # checks the two agree).
    steps: int = Field(default=300, ge=1, le=5000)
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
    keep_checkpoints: bool = Field(
        default=False,
        description="Also keep the adapter as it is at every progress-image step "
        "(GET /v1/finetunes/{id}/checkpoints; promote one to an adapter). Only with "
        "validation_prompts; each counts in the stored bytes until the fine-tune is deleted.",
    )

    @model_validator(mode="after")
    def _sampling(self) -> FinetuneParams:
        if not self.validation_prompts:
            if self.sample_every is not None:
                raise ValueError("sample_every needs validation_prompts; give at least one")
            if self.keep_checkpoints:
                raise ValueError(
                    "keep_checkpoints keeps the adapter at the progress-image steps, so it "
                    "needs validation_prompts; give at least one"
                )
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


class FinetuneLinks(BaseModel):
    self: str
    cancel: str | None = Field(
        default=None, description="POST here to cancel; only while queued or running."
    )
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
    webhook_events: list[WebhookEvent] = Field(description="Events that get a webhook.")
    webhook: WebhookPublic | None = Field(description="The delivery of the final state's webhook.")
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
    phase: Phase | None = Field(
        description=PHASE_DOC + " A fine-tune's: loading base, preparing photos, making class "
        "images (class_prompt), training, progress images (validation_prompts), saving."
    )
    waiting_reason: str | None = Field(description=WAITING_DOC)
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: FinetuneLinks

    @classmethod
    def from_row(
        cls, job: models.FinetuneJob, waiting: dict[str, str] | None = None
    ) -> FinetunePublic:
        """`waiting`: why queued jobs of each base wait (app.services.bases.waiting_reasons)."""
        adapter_id = job.adapter.id if job.adapter is not None else None
        phase, reason = phase_of(job.status, job.phase, job.base_model, waiting)
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
            webhook_events=chosen_events(job),  # type: ignore[arg-type]
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
            phase=phase,
            waiting_reason=reason,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            links=FinetuneLinks(
                self=f"/v1/finetunes/{job.id}",
                cancel=f"/v1/finetunes/{job.id}/cancel"
                if job.status in models.ACTIVE_STATUSES
                else None,
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


class FinetunesPublic(BaseModel):
    data: list[FinetunePublic]
    count: int = Field(description="Number of matching jobs across all pages.")
