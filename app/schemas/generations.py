"""Generation jobs: the request and its images."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app import models
from app.models import Phase, Status, WebhookEvent
from app.outbox import chosen_events
from app.schemas.common import (
    PHASE_DOC,
    SEED_MAX,
    WAITING_DOC,
    Scheduler,
    WebhookPublic,
    phase_of,
)


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
    negative_prompt: str | None = Field(
        default=None,
        max_length=10_000,
        description="Only for bases that use one (not FLUX.1 [dev] or [schnell]; GET /v1/bases "
        "`generation.negative_prompt`).",
    )
    num_images: int = Field(default=1, ge=1, le=64)
    steps: int | None = Field(
        default=None, ge=1, le=1000, description="Default: the base's (GET /v1/bases)."
    )
    guidance_scale: float | None = Field(
        default=None,
        ge=0,
        le=30,
        description="Classifier-free guidance (FLUX with CFG: the true CFG scale), or for a "
        "guidance-distilled base (FLUX.1 [dev]) the guidance embedding; refused by a base "
        "that takes none (FLUX.1 [schnell]). Default: the base's (GET /v1/bases).",
    )
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
    scheduler: Scheduler | None = Field(
        default=None,
        description="One of the base's schedulers (GET /v1/bases); default: the base's.",
    )
    compare_base: bool = Field(
        default=False,
        description="Also make the plain base's images with the same seeds, in the same batch "
        "(marked `base: true` in `images`), to see what the adapter changes. Needs adapter_id; "
        "counts twice in num_images limits and the compute budget.",
    )
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
    base: bool = Field(
        description="An image of the plain base with the same seed as the adapter image beside "
        "it (compare_base); false for the adapter's (or, without adapter_id, the base's) images."
    )
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
    compare_base: bool
    webhook_url: str | None
    webhook_events: list[WebhookEvent] = Field(description="Events that get a webhook.")
    webhook: WebhookPublic | None = Field(description="The delivery of the final state's webhook.")
    error: str | None
    phase: Phase | None = Field(
        description=PHASE_DOC + " A generation's: loading base, generating, saving."
    )
    waiting_reason: str | None = Field(description=WAITING_DOC)
    images: list[GeneratedImagePublic] = Field(
        description="num_images images (seed, seed + 1, ...), then with compare_base as many of "
        "the plain base with the same seeds (`base: true`)."
    )
    time_limit_s: float | None = Field(description="Seconds the job may run from its start.")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    links: GenerationLinks

    @classmethod
    def from_row(
        cls, gen: models.GenerationJob, waiting: dict[str, str] | None = None
    ) -> GenerationPublic:
        """`waiting`: why queued jobs of each base wait (app.services.bases.waiting_reasons)."""
        phase, reason = phase_of(gen.status, gen.phase, gen.base_model, waiting)
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
            compare_base=gen.compare_base,
            webhook_url=gen.webhook_url,
            webhook_events=chosen_events(gen),  # type: ignore[arg-type]
            webhook=WebhookPublic.from_row(gen.webhook),
            error=gen.error,
            phase=phase,
            waiting_reason=reason,
            images=[
                GeneratedImagePublic(
                    index=img.index,
                    seed=img.seed,
                    base=img.base,
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
