"""The bases the workers serve."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app import models


class SizeRangePublic(BaseModel):
    default: int = Field(description="The native resolution, used when a request omits a size.")
    min: int
    max: int


class GenerationDefaultsPublic(BaseModel):
    """What a generation on this base may send, and what it gets when it sends nothing."""

    steps: int = Field(description="Default steps.")
    guidance_scale: float = Field(description="Default guidance_scale (0: the base takes none).")
    guidance: models.Guidance = Field(
        description="What guidance_scale means: `cfg` classifier-free guidance (also a FLUX "
        "model marked for it, such as the built-in fashion-flux), `embedded` the "
        "distilled guidance embedding of FLUX.1 [dev], `none` not accepted (FLUX.1 [schnell])."
    )
    guidance_meaning: str = Field(description="The same, in words.")
    scheduler: str = Field(description="Default scheduler.")
    schedulers: list[str] = Field(description="The schedulers the base runs.")
    negative_prompt: bool = Field(description="Whether negative_prompt is accepted.")


class FinetuneDefaultsPublic(BaseModel):
    """What a fine-tune on this base trains with where its params omit a value."""

    steps: int
    lr_s_in: float
    lr_s_out: float | None = Field(
        description="null: relative to the base's median quantization step (params.lr_s_out)."
    )
    batch_size: int
    resolution: int = Field(
        description="The native resolution for UNet bases; for FLUX and SD3 512 px where that "
        "is smaller (their DreamBooth training default)."
    )


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
    family: models.Family = Field(
        description="Model family, from the model's own config: `sd` (SD 1.x/2.x), `sdxl`, "
        "`sd3` (SD3/SD3.5) or `flux` (FLUX.1)."
    )
    native_resolution: int = Field(
        description="The side the family's pipeline generates by default, in pixels: the UNet's "
        "or SD3 transformer's sample size (FLUX: the pipeline's 128) × the VAE's scale factor."
    )
    sizes: SizeRangePublic = Field(
        description="Accepted fine-tune resolution and generation width/height (multiples of "
        "size_multiple)."
    )
    size_multiple: int = Field(
        description="Every side is a multiple of this: 8 for UNet bases; the VAE's scale "
        "factor × 2 for FLUX and SD3 (16 for their public checkpoints)."
    )
    generation: GenerationDefaultsPublic
    finetune: FinetuneDefaultsPublic
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
        generation: GenerationDefaultsPublic,
        finetune: FinetuneDefaultsPublic,
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
            family=row.family,  # type: ignore[arg-type]
            native_resolution=row.native_resolution,
            sizes=sizes,
            size_multiple=row.size_multiple,
            generation=generation,
            finetune=finetune,
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
