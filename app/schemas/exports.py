"""Exports of an adapter (LoRA or merged checkpoint)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app import models
from app.models import ExportFormat, ExportStatus


class ExportCreate(BaseModel):
    """What to export (docs/api.md, "Exports"); the adapter's own bounds (its intervals, the
    service's largest rank) are checked by the service."""

    # Strict types in the JSON body (a boolean or a string is not a rank); ExportQuery, the
    # same fields in a query string, where every value is text, converts them.
    model_config = ConfigDict(extra="forbid", strict=True)

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
    attempts: int = Field(
        description="Runs started so far (at most TUNEQDM_MAX_ATTEMPTS); `error` says how the "
        "last one ended while it is queued again."
    )
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
            attempts=row.attempts,
            created_at=row.created_at,
            finished_at=row.finished_at,
            links=ExportLinks(file=f"/v1/adapters/{row.adapter_id}/export?{query}"),
        )


class ExportsPublic(BaseModel):
    data: list[ExportPublic]
    count: int


class ExportQuery(ExportCreate):
    """ExportCreate read from a query string (GET .../export?format=lora&rank=16)."""

    model_config = ConfigDict(extra="forbid", strict=False)
