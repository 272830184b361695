"""Exports of an adapter (LoRA in PEFT or kohya keys, merged UNet, merged checkpoint)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app import models
from app.models import ExportFormat, ExportStatus, WebhookEvent
from app.outbox import chosen_events

LORA_FORMATS = ("lora", "lora-kohya")
# A fixed-rank LoRA whose relative error is above this is flagged in `warnings` (the library's
# tuneqdm_core.export.WARN_RELATIVE_ERROR; tests check the two agree).
WARN_RELATIVE_ERROR = 0.1


class ExportVariant(BaseModel):
    """Which file of an adapter (docs/api.md, "Exports"); the adapter's own bounds (its
    intervals, the service's largest rank) are checked by the service."""

    # Strict types in the JSON body (a boolean or a string is not a rank); ExportQuery, the
    # same fields in a query string, where every value is text, converts them.
    model_config = ConfigDict(extra="forbid", strict=True)

    format: ExportFormat = Field(
        description="lora: a LoRA file for diffusers' load_lora_weights (PEFT keys); "
        "lora-kohya: the same LoRA in kohya/A1111 keys (lora_unet_…lora_down/lora_up/alpha); "
        "merged: the float UNet with the adapter written in (one fp16 .safetensors file); "
        "merged-checkpoint: the whole merged model (UNet, VAE, text encoders) as one fp16 "
        "original-layout checkpoint, the file A1111, ComfyUI and from_single_file read."
    )
    rank: int | None = Field(
        default=None,
        ge=1,
        description="LoRA rank of every layer (a LoRA needs rank or max_relative_error).",
    )
    max_relative_error: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Instead of rank: per layer the smallest rank whose relative error "
        "‖D − B·A‖ / ‖D‖ stays within this (e.g. 0.05); the file's size follows.",
    )
    # "mean" is also the library's default (tuneqdm_core.export); see docs/library.md.
    interval: str = Field(
        default="mean",
        max_length=8,
        description="Which timestep interval's weights: an index, or 'mean' (time-weighted).",
    )

    @model_validator(mode="after")
    def _rank_for_lora(self) -> ExportVariant:
        chosen = (self.rank is not None) + (self.max_relative_error is not None)
        if self.format in LORA_FORMATS and chosen != 1:
            raise ValueError(
                f"format={self.format} needs either rank (e.g. 16) or max_relative_error "
                "(e.g. 0.05), not both"
            )
        if self.format not in LORA_FORMATS and chosen:
            raise ValueError(
                f"rank and max_relative_error apply to LoRA formats only; leave them out for "
                f"{self.format}"
            )
        if self.interval != "mean" and not self.interval.isdigit():
            raise ValueError(f"interval must be 'mean' or an index, got {self.interval!r}")
        return self

    @property
    def variant(self) -> str:
        rank = f"-r{self.rank}" if self.rank is not None else ""
        if self.max_relative_error is not None:
            rank = f"-e{self.max_relative_error:g}"
        return f"{self.format}{rank}-{self.interval}"


class ExportCreate(ExportVariant):
    """What to export and, for the request that queues it, whom to tell (docs/api.md,
    "Exports")."""

    webhook_url: str | None = Field(
        default=None,
        max_length=2048,
        description="Receives a signed POST when the export finishes. An export is shared by "
        "every request for its variant: only the request that queues it may set a webhook.",
    )
    webhook_events: list[str] | None = Field(
        default=None,
        max_length=len(models.WEBHOOK_EVENTS),
        description="Events that get a webhook: running, succeeded, failed, canceled "
        "(docs/api.md, Webhooks); default: the final states (succeeded, failed, canceled).",
    )


def variant_max_relative_error(variant: str) -> float | None:
    """The max_relative_error a variant (:attr:`ExportVariant.variant`) was asked with."""
    for part in variant.split("-"):
        if part.startswith("e") and part[1:2].isdigit():
            return float(part[1:])
    return None


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
        description="The file's error against the adapter's weights: a LoRA's ‖D − B·A‖ / ‖D‖ "
        "over all layers (0 at full rank), a merge's rounding to fp16."
    )
    max_relative_error: float | None = None
    warnings: list[str] = Field(
        default_factory=list,
        description="E.g. a fixed-rank LoRA whose relative_error is above 0.1: its images will "
        "differ from the adapter's.",
    )
    error: str | None
    attempts: int = Field(
        description="Runs started so far (at most TUNEQDM_MAX_ATTEMPTS); `error` says how the "
        "last one ended while it is queued again."
    )
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: list(models.FINAL_EVENTS),
        description="Events that get a webhook.",
    )
    created_at: datetime
    finished_at: datetime | None
    links: ExportLinks

    @classmethod
    def from_row(cls, row: models.AdapterExport) -> ExportPublic:
        query = f"format={row.format}&interval={row.interval}"
        if row.rank is not None:
            query += f"&rank={row.rank}"
        bound = variant_max_relative_error(row.variant)
        if bound is not None:
            query += f"&max_relative_error={bound:g}"
        warnings = []
        error = row.relative_error
        if row.rank is not None and error is not None and error > WARN_RELATIVE_ERROR:
            warnings.append(
                f"rank {row.rank} keeps the adapter's weights only to a relative error of "
                f"{error:.3f} (above {WARN_RELATIVE_ERROR}): its images will differ from the "
                "adapter's; ask for max_relative_error (e.g. 0.05) or a higher rank, or a "
                "merged format"
            )
        return cls(
            id=row.id,
            adapter_id=row.adapter_id,
            format=row.format,  # type: ignore[arg-type]
            rank=row.rank,
            interval=row.interval,
            status=row.status,  # type: ignore[arg-type]
            size_bytes=row.size_bytes,
            relative_error=row.relative_error,
            max_relative_error=bound,
            warnings=warnings,
            error=row.error,
            attempts=row.attempts,
            webhook_url=row.webhook_url,
            webhook_events=chosen_events(row),  # type: ignore[arg-type]
            created_at=row.created_at,
            finished_at=row.finished_at,
            links=ExportLinks(file=f"/v1/adapters/{row.adapter_id}/export?{query}"),
        )


class ExportsPublic(BaseModel):
    data: list[ExportPublic]
    count: int


class ExportQuery(ExportVariant):
    """ExportVariant read from a query string (GET .../export?format=lora&rank=16); a download
    has no webhook."""

    model_config = ConfigDict(extra="forbid", strict=False)
