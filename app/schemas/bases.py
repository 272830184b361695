"""The bases the workers serve."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app import models


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
