"""Generation jobs: the request and its images."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app import models
from app.models import Status, WebhookEvent
from app.outbox import chosen_events
from app.schemas.common import SEED_MAX, Scheduler, WebhookPublic


class GenerationCreate(BaseModel):
    """Static bounds here; the tighter, configurable limits are checked by the service.
    Strict types: a boolean or a string is not a number."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

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
    webhook_events: list[str] | None = Field(
        default=None,
        max_length=len(models.WEBHOOK_EVENTS),
        description="Events that get a webhook: running, succeeded, failed, canceled "
        "(docs/api.md, Webhooks); default: the final states (succeeded, failed, canceled).",
    )


class GeneratedImagePublic(BaseModel):
    index: int
    seed: int
    url: str


class GenerationLinks(BaseModel):
    self: str
    cancel: str | None = Field(
        default=None, description="POST here to cancel; only while queued or running."
    )
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
    webhook_events: list[WebhookEvent] = Field(description="Events that get a webhook.")
    webhook: WebhookPublic | None = Field(description="The delivery of the final state's webhook.")
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
            webhook_events=chosen_events(gen),  # type: ignore[arg-type]
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
                cancel=f"/v1/generations/{gen.id}/cancel"
                if gen.status in models.ACTIVE_STATUSES
                else None,
                adapter=f"/v1/adapters/{gen.adapter_id}" if gen.adapter_id else None,
            ),
        )


class GenerationsPublic(BaseModel):
    data: list[GenerationPublic]
    count: int = Field(description="Number of matching generations across all pages.")
