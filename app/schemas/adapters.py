"""Adapters, the files fine-tunes make."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from app import models
from app.models import Method


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
