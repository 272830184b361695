"""ORM models: the registry that is the source of truth for every job's state (docs/design.md).

Shared with the worker, so no FastAPI here. The schema itself changes only through Alembic
revisions in migrations/; a test checks that the revisions and these models agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    and_,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, foreign, mapped_column, relationship

# Each literal type is the one list of its values: the API's schemas (app/schemas/) use the
# type, the CHECK constraints below the tuple of its values.
Status = Literal["queued", "running", "succeeded", "failed", "canceled"]
Method = Literal["tuneqdm", "peqa", "full"]
# Migration 0016 widened ck_adapter_exports_format (and the column) for lora-kohya and
# merged-checkpoint.
ExportFormat = Literal["lora", "lora-kohya", "merged", "merged-checkpoint"]
ExportStatus = Literal["queued", "running", "succeeded", "failed", "canceled"]
DeliveryStatus = Literal["pending", "delivered", "failed"]
# A base's model family and how it uses guidance_scale (app/families.py; migration 0017):
# classifier-free guidance, an embedding the model was distilled with (FLUX.1 [dev]), or not
# at all (FLUX.1 [schnell]).
Family = Literal["sd", "sdxl", "sd3", "flux"]
Guidance = Literal["cfg", "embedded", "none"]
# What a fine-tune's event log records (app/events.py, docs/api.md "Events"); migration 0018
# added "phase".
EventType = Literal[
    "queued",
    "running",
    "released",
    "progress",
    "samples",
    "phase",
    "succeeded",
    "failed",
    "canceled",
    "webhook",
]

# What a job is doing (docs/api.md "Phases"): "waiting for a worker" while queued (the API
# derives it), the rest written by the worker while it runs; null once the job is final.
Phase = Literal[
    "waiting for a worker",
    "loading base",
    "preparing photos",
    "making class images",
    "training",
    "progress images",
    "generating",
    "saving",
]

# What a job's webhook_events may ask for (docs/api.md "Webhooks"); generations and exports
# have no progress or progress images. NULL on a job: the final states only.
WebhookEvent = Literal["running", "progress", "samples", "succeeded", "failed", "canceled"]

FINETUNE_STATUSES: tuple[Status, ...] = get_args(Status)
GENERATION_STATUSES = FINETUNE_STATUSES
ACTIVE_STATUSES = ("queued", "running")
METHODS: tuple[Method, ...] = get_args(Method)
EXPORT_FORMATS: tuple[ExportFormat, ...] = get_args(ExportFormat)
EXPORT_STATUSES: tuple[ExportStatus, ...] = get_args(ExportStatus)
DELIVERY_STATUSES: tuple[DeliveryStatus, ...] = get_args(DeliveryStatus)
FAMILIES: tuple[Family, ...] = get_args(Family)
GUIDANCE_KINDS: tuple[Guidance, ...] = get_args(Guidance)
# The kinds of job a webhook delivery tells of (its `job_kind`, its type's prefix).
JOB_KINDS = ("finetune", "generation", "export")
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = get_args(WebhookEvent)
FINAL_EVENTS: tuple[WebhookEvent, ...] = ("succeeded", "failed", "canceled")
KIND_WEBHOOK_EVENTS: dict[str, tuple[WebhookEvent, ...]] = {
    "finetune": WEBHOOK_EVENTS,
    "generation": ("running", *FINAL_EVENTS),
    "export": ("running", *FINAL_EVENTS),
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the offset otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use app.models.utcnow()")
        return value.astimezone(timezone.utc) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


# Stable constraint names so migrations can drop/alter them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Per-tenant overrides of TUNEQDM_TENANT_RPM / _ACTIVE_JOBS / _STORED_BYTES (NULL: the
    # setting; 0: unlimited), set with `tuneqdm-admin tenants limits`.
    rpm_limit: Mapped[int | None] = mapped_column(Integer)
    active_jobs_limit: Mapped[int | None] = mapped_column(Integer)
    stored_bytes_limit: Mapped[int | None] = mapped_column(BigInteger)
    # Requests counted in the current minute (app/services/quotas.py): the minute's number
    # since the epoch and the count, updated by one conditional UPDATE per request.
    rate_window: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    rate_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The webhook signing secret is derived from TUNEQDM_SECRET_KEY, the tenant id and this
    # version (app.webhooks); rotating bumps it, and the previous version still signs until
    # TUNEQDM_WEBHOOK_SECRET_OVERLAP_S after `webhook_secret_rotated_at`.
    webhook_secret_version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_secret_rotated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # First characters of the key, so an operator can tell keys apart in `keys list`.
    key_hint: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    tenant: Mapped[Tenant] = relationship()


class FinetuneJob(Base):
    __tablename__ = "finetune_jobs"
    __table_args__ = (
        CheckConstraint(_in("status", FINETUNE_STATUSES), name="status"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_finetune_jobs_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    instance_prompt: Mapped[str] = mapped_column(Text)
    class_prompt: Mapped[str | None] = mapped_column(Text)
    token: Mapped[str] = mapped_column(String(32))
    # The base it trains on (the `base` field, default TUNEQDM_BASE_MODEL): only that base's
    # workers claim it (worker/jobs.py), and its adapter is of that base.
    base_model: Mapped[str] = mapped_column(String(255))
    # Validated FinetuneParams with defaults filled in, so the worker never re-applies defaults.
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    # Events that get a webhook (WebhookEvent values, in a fixed order); NULL: final states.
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # Photos uploaded; stays when the photos themselves are deleted (photos_deleted_at).
    num_images: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    photos_deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # SHA-256 of the request the key was first used with (app/idempotency.py).
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64))
    # Progress, written by the worker.
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer)
    loss: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The worker's lease (worker/jobs.py): who runs the job and when it last said so. A job
    # whose heartbeat is older than TUNEQDM_STALE_AFTER_S is taken over by another worker. A
    # finished job keeps it: "<host>:<pid>:<claim>", the worker that ran its last attempt.
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Step the last run resumed from (0: from scratch), so resuming is visible.
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)
    # Claims so far (worker/jobs.py): capped by TUNEQDM_MAX_ATTEMPTS, and part of the paths of
    # the files an attempt writes, so two attempts never write the same file.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Seconds the job may run counted from started_at (TUNEQDM_FINETUNE_TIME_LIMIT_S at
    # submit), enforced by the worker; null on jobs submitted before the limit existed.
    time_limit_s: Mapped[float | None] = mapped_column(Float)
    # Jobs its worker trains in one loop with this one, itself included (worker/cotrain.py),
    # as of its last membership change; null when it ran alone (TUNEQDM_COTRAIN_MAX).
    group_size: Mapped[int | None] = mapped_column(Integer)
    # What the worker is doing while it runs (Phase); cleared when the job ends or is given back.
    phase: Mapped[str | None] = mapped_column(String(32))

    images: Mapped[list[FinetuneImage]] = relationship(
        back_populates="job", order_by="FinetuneImage.index", cascade="all, delete-orphan"
    )
    adapter: Mapped[Adapter | None] = relationship(back_populates="finetune_job")
    # The delivery of its final state (a job has at most one; its other events have theirs).
    webhook: Mapped[WebhookDelivery | None] = relationship(
        primaryjoin=lambda: _final_delivery(FinetuneJob.id), viewonly=True
    )


class FinetuneImage(Base):
    """One uploaded subject photo, downscaled and re-encoded to JPEG at `storage_key`."""

    __tablename__ = "finetune_images"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_finetune_images_job_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("finetune_jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(255))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(Integer)

    job: Mapped[FinetuneJob] = relationship(back_populates="images")


class Adapter(Base):
    """A trained adapter file; rows are created by the worker when a fine-tune succeeds."""

    __tablename__ = "adapters"
    __table_args__ = (
        CheckConstraint(_in("method", METHODS), name="method"),
        CheckConstraint("bits IN (4, 8)", name="bits"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    finetune_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("finetune_jobs.id", ondelete="SET NULL"), unique=True
    )
    name: Mapped[str | None] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(16))
    bits: Mapped[int] = mapped_column(Integer)
    intervals: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[list[str]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    base_model: Mapped[str] = mapped_column(String(255))
    base_fingerprint: Mapped[str] = mapped_column(String(128))
    storage_key: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)

    finetune_job: Mapped[FinetuneJob | None] = relationship(back_populates="adapter")


class GenerationJob(Base):
    __tablename__ = "generation_jobs"
    __table_args__ = (
        CheckConstraint(_in("status", GENERATION_STATUSES), name="status"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_generation_jobs_idempotency"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # Not a foreign key: the job keeps naming the adapter it asked for after a DELETE.
    adapter_id: Mapped[str | None] = mapped_column(String(40), index=True)
    base_model: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    num_images: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    # Image i uses seed + i, so every image can be reproduced on its own.
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    scheduler: Mapped[str] = mapped_column(String(32))
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    idempotency_fingerprint: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # As on finetune_jobs, from TUNEQDM_GENERATION_TIME_LIMIT_S.
    time_limit_s: Mapped[float | None] = mapped_column(Float)
    phase: Mapped[str | None] = mapped_column(String(32))
    # Also the base's images with the same seeds, in the same batch (marked `base`).
    compare_base: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    images: Mapped[list[GeneratedImage]] = relationship(
        back_populates="generation",
        order_by="GeneratedImage.index",
        cascade="all, delete-orphan",
    )
    webhook: Mapped[WebhookDelivery | None] = relationship(
        primaryjoin=lambda: _final_delivery(GenerationJob.id), viewonly=True
    )


class ServedBase(Base):
    """A base model workers serve (app/bases.py): what every request's defaults and bounds
    derive from. Written by workers when they start and when they load the model."""

    __tablename__ = "bases"
    __table_args__ = (
        CheckConstraint("bits IN (4, 8)", name="bits"),
        CheckConstraint(_in("family", FAMILIES), name="family"),
        CheckConstraint(_in("guidance", GUIDANCE_KINDS), name="guidance"),
    )

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    source: Mapped[str] = mapped_column(String(1024))  # model folder or hub id
    native_resolution: Mapped[int] = mapped_column(Integer)
    prediction_type: Mapped[str] = mapped_column(String(32))
    bits: Mapped[int] = mapped_column(Integer)
    # app/families.py: what generations may ask of it; sides are multiples of size_multiple.
    family: Mapped[str] = mapped_column(String(16), default="sd", server_default="sd")
    guidance: Mapped[str] = mapped_column(String(16), default="cfg", server_default="cfg")
    size_multiple: Mapped[int] = mapped_column(Integer, default=8, server_default="8")
    # Known once a worker has loaded (quantized) the model.
    fingerprint: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(32))
    storage_mode: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    workers: Mapped[list[BaseWorker]] = relationship(
        back_populates="base", order_by="BaseWorker.worker", cascade="all, delete-orphan"
    )


class BaseWorker(Base):
    """A worker process serving a base, and when it last said so."""

    __tablename__ = "base_workers"

    base_name: Mapped[str] = mapped_column(
        ForeignKey("bases.name", ondelete="CASCADE"), primary_key=True
    )
    worker: Mapped[str] = mapped_column(String(100), primary_key=True)
    device: Mapped[str | None] = mapped_column(String(32))
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    base: Mapped[ServedBase] = relationship(back_populates="workers")


class GeneratedImage(Base):
    """A PNG produced by the worker for one generation job."""

    __tablename__ = "generated_images"
    __table_args__ = (
        UniqueConstraint("generation_id", "index", name="uq_generated_images_generation_index"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    generation_id: Mapped[str] = mapped_column(ForeignKey("generation_jobs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    # An image of the plain base (compare_base), made with the same seed as an adapter image.
    base: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    storage_key: Mapped[str] = mapped_column(String(255))
    # Counted in the tenant's stored bytes (TUNEQDM_TENANT_STORED_BYTES).
    size_bytes: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    generation: Mapped[GenerationJob] = relationship(back_populates="images")


class AdapterExport(Base):
    """An adapter converted for other tools (a LoRA file or a merged UNet), made by a worker on
    request; one row per adapter and variant (format, rank, interval)."""

    __tablename__ = "adapter_exports"
    __table_args__ = (
        CheckConstraint(_in("format", EXPORT_FORMATS), name="format"),
        CheckConstraint(_in("status", EXPORT_STATUSES), name="status"),
        UniqueConstraint("adapter_id", "variant", name="uq_adapter_exports_variant"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    adapter_id: Mapped[str] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    # "lora-r16-mean", "merged-1": the unique name of what was asked for (a NULL rank would
    # not make a unique constraint hold).
    variant: Mapped[str] = mapped_column(String(40))
    format: Mapped[str] = mapped_column(String(24))
    rank: Mapped[int | None] = mapped_column(Integer)
    # A timestep interval index as text, or "mean".
    interval: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    # The adapter's base: a worker of that base makes the export (its queue, its claims).
    base_model: Mapped[str] = mapped_column(String(255))
    storage_key: Mapped[str | None] = mapped_column(String(255))
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The job lease, as on the other job tables (worker/jobs.py).
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # LoRA only: ‖D − B·A‖ / ‖D‖ over all layers (docs/library.md, "Exports").
    relative_error: Mapped[float | None] = mapped_column(Float)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set by the request that queues the export (docs/api.md, "Exports"): the row is shared by
    # every request for its variant, so a later request may not name another webhook.
    webhook_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_events: Mapped[list[str] | None] = mapped_column(JSON)


class WebhookDelivery(Base):
    """The outbox row of one webhook of a job, written in the transaction of the event it
    tells (the job's final state, its start, a progress write, progress images).

    Senders claim an attempt with a conditional UPDATE (worker/webhooks.py); a row whose sender
    died becomes due again when its `next_attempt_at` (the claim's lease) passes, so the sweep
    sends it again: no webhook is lost, and exactly one sender makes each attempt.
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_in("status", DELIVERY_STATUSES), name="status"),
        CheckConstraint(_in("job_kind", JOB_KINDS), name="job_kind"),
        UniqueConstraint("job_id", "sequence", name="uq_webhook_deliveries_job_sequence"),
    )

    # Also the `webhook-id` header: the same on every attempt, so receivers can drop repeats.
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    job_kind: Mapped[str] = mapped_column(String(16))
    # Not a foreign key: the row outlives a deleted job.
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    # 0, 1, 2, … per job in the order of its events (taken under the job's row lock): a
    # delivery is sent only once the job's earlier ones are no longer pending.
    sequence: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    url: Mapped[str] = mapped_column(String(2048))
    event: Mapped[str] = mapped_column(String(40))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


def _final_delivery(job_id: Any) -> Any:
    return and_(
        job_id == foreign(WebhookDelivery.job_id),
        WebhookDelivery.event.in_([f"{k}.{e}" for k in JOB_KINDS for e in FINAL_EVENTS]),
    )


class FinetuneSample(Base):
    """A progress image: prompt `prompt_index` of the job's validation_prompts at `step`,
    made by the worker with the adapter as trained so far. One row per (step, prompt), so a
    resumed job that samples a step again adds nothing."""

    __tablename__ = "finetune_samples"
    __table_args__ = (
        UniqueConstraint("job_id", "step", "prompt_index", name="uq_finetune_samples_step"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("finetune_jobs.id", ondelete="CASCADE"), index=True
    )
    step: Mapped[int] = mapped_column(Integer)
    prompt_index: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FinetuneCheckpoint(Base):
    """The adapter as it was at `step`, kept for a job with params.keep_checkpoints (one per
    progress-image step), written by the attempt named in its key (worker/files.py). One row
    per step, so a resumed job that reaches a step again adds nothing. It stays until the
    fine-tune is deleted; promoting it copies the file into a registry adapter."""

    __tablename__ = "finetune_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_finetune_checkpoints_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("finetune_jobs.id", ondelete="CASCADE"), index=True
    )
    step: Mapped[int] = mapped_column(Integer)
    storage_key: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class FinetuneEvent(Base):
    """One entry of a fine-tune's event log, written in the transaction of what it records
    while that transaction holds the job's row lock, so ids grow in commit order per job (the
    cursor of GET /v1/finetunes/{id}/events never skips one)."""

    __tablename__ = "finetune_events"
    __table_args__ = (CheckConstraint(_in("type", EVENT_TYPES), name="type"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(
        ForeignKey("finetune_jobs.id", ondelete="CASCADE"), index=True
    )
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
