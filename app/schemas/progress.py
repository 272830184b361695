"""What a fine-tune shows while it trains: progress images, kept checkpoints and the event
log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app import models
from app.models import EventType


def sample_url(row: models.FinetuneSample) -> str:
    return f"/v1/finetunes/{row.job_id}/samples/{row.step}/{row.prompt_index}"


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
            url=sample_url(row),
            created_at=row.created_at,
        )


class SamplesPublic(BaseModel):
    data: list[SamplePublic] = Field(description="By step, then prompt index.")
    count: int


class CheckpointPublic(BaseModel):
    step: int = Field(description="Training step the adapter had reached.")
    size_bytes: int = Field(description="Bytes of the adapter file (counted in stored bytes).")
    created_at: datetime
    samples: list[str] = Field(
        description="The progress images made with this adapter, by prompt index (same API "
        "key); empty when none are stored for its step."
    )
    promote: str = Field(description="POST here to make it a registry adapter.")

    @classmethod
    def from_row(cls, row: models.FinetuneCheckpoint, sample_urls: list[str]) -> CheckpointPublic:
        return cls(
            step=row.step,
            size_bytes=row.size_bytes,
            created_at=row.created_at,
            samples=sample_urls,
            promote=f"/v1/finetunes/{row.job_id}/checkpoints/{row.step}/promote",
        )


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic] = Field(description="By step.")
    count: int


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
