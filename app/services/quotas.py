"""Per-tenant limits: requests per minute, queued + running jobs, stored bytes.

Each limit is a setting (TUNEQDM_TENANT_*) that a tenant's row can override
(`tuneqdm-admin tenants limits`); 0 means unlimited. A request over a limit gets
TooManyRequests (429 with Retry-After) whose message names the limit.

Requests are counted in the database, not in the process, so every API replica shares one
count and the embedded mode (no Redis) behaves like a deployment: one conditional UPDATE of the
tenant's row per request, a fixed one-minute window from the epoch (the replicas' clocks must
agree to a second or so, which NTP gives).

The job, byte and export limits are checked against the rows when a job or an export is
created, under the tenant's row lock (`lock_tenant`) that the caller holds until it has
inserted the row and committed: concurrent requests of one tenant, in any number of API
processes, are admitted one after the other, so a limit is never overshot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from app.errors import TooManyRequests
from app.models import (
    ACTIVE_STATUSES,
    Adapter,
    AdapterExport,
    FinetuneCheckpoint,
    FinetuneImage,
    FinetuneJob,
    FinetuneSample,
    GeneratedImage,
    GenerationJob,
    Tenant,
)
from app.settings import Settings

WINDOW_S = 60
# A tenant at its job or byte limit must first wait for jobs to end or delete something;
# this is how often it is worth asking again.
RETRY_AFTER_QUOTA_S = 30


@dataclass(frozen=True)
class Limits:
    rpm: int
    active_jobs: int
    stored_bytes: int
    exports: int


def limits_of(tenant: Tenant, settings: Settings) -> Limits:
    def pick(override: int | None, default: int) -> int:
        return default if override is None else override

    return Limits(
        rpm=pick(tenant.rpm_limit, settings.tenant_rpm),
        active_jobs=pick(tenant.active_jobs_limit, settings.tenant_active_jobs),
        stored_bytes=pick(tenant.stored_bytes_limit, settings.tenant_stored_bytes),
        exports=settings.tenant_exports,
    )


def count_request(
    *, session: Session, tenant: Tenant, settings: Settings, now: float | None = None
) -> None:
    """Count one request of `tenant` in the current minute; raise when it is over the limit.

    The caller commits (the row lock of the UPDATE lasts until then, so it commits at once).
    """
    rpm = limits_of(tenant, settings).rpm
    if rpm == 0:
        return
    now = time.time() if now is None else now
    window = int(now // WINDOW_S)
    count = session.execute(
        update(Tenant)
        .where(Tenant.id == tenant.id)
        .values(
            rate_count=case((Tenant.rate_window == window, Tenant.rate_count + 1), else_=1),
            rate_window=window,
        )
        .returning(Tenant.rate_count)
        .execution_options(synchronize_session=False)
    ).scalar_one()
    if count > rpm:
        retry = int((window + 1) * WINDOW_S - now) + 1
        raise TooManyRequests(
            f"rate limit reached: at most {rpm} requests per minute for this tenant "
            f"(requests per minute limit); retry in {retry} s",
            retry_after_s=retry,
        )


def active_jobs(session: Session, tenant_id: str) -> int:
    total = 0
    for model in (FinetuneJob, GenerationJob):
        total += int(
            session.scalar(
                select(func.count())
                .select_from(model)
                .where(model.tenant_id == tenant_id, model.status.in_(ACTIVE_STATUSES))
            )
            or 0
        )
    return total


def stored_bytes(session: Session, tenant_id: str) -> int:
    photos = select(func.coalesce(func.sum(FinetuneImage.size_bytes), 0)).where(
        FinetuneImage.job_id.in_(select(FinetuneJob.id).where(FinetuneJob.tenant_id == tenant_id))
    )
    adapters = select(func.coalesce(func.sum(Adapter.size_bytes), 0)).where(
        Adapter.tenant_id == tenant_id
    )
    images = select(func.coalesce(func.sum(GeneratedImage.size_bytes), 0)).where(
        GeneratedImage.generation_id.in_(
            select(GenerationJob.id).where(GenerationJob.tenant_id == tenant_id)
        )
    )
    samples = select(func.coalesce(func.sum(FinetuneSample.size_bytes), 0)).where(
        FinetuneSample.job_id.in_(select(FinetuneJob.id).where(FinetuneJob.tenant_id == tenant_id))
    )
    exports = select(func.coalesce(func.sum(AdapterExport.size_bytes), 0)).where(
        AdapterExport.tenant_id == tenant_id
    )
    checkpoints = select(func.coalesce(func.sum(FinetuneCheckpoint.size_bytes), 0)).where(
        FinetuneCheckpoint.job_id.in_(
            select(FinetuneJob.id).where(FinetuneJob.tenant_id == tenant_id)
        )
    )
    parts = (photos, adapters, images, samples, exports, checkpoints)
    return sum(int(session.scalar(stmt) or 0) for stmt in parts)


def lock_tenant(session: Session, tenant_id: str) -> None:
    """Take the tenant's row lock, held until the caller commits or rolls back: what is counted
    after it, and the row inserted before the commit, are one step for every other request of
    this tenant in every API process."""
    if session.get_bind().dialect.name == "sqlite":
        # SQLite has one lock for the whole database, and a transaction that has read cannot
        # become a writer while another one writes (SQLITE_BUSY at once, without waiting). So
        # the transaction starts afresh with a write: it takes the write lock at once (waiting
        # its turn, up to the busy timeout), like BEGIN IMMEDIATE, and keeps it to the commit.
        session.commit()
        session.execute(
            update(Tenant)
            .where(Tenant.id == tenant_id)
            .values(id=Tenant.id)
            .execution_options(synchronize_session=False)
        )
    else:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def check_new_job(
    *, session: Session, tenant: Tenant, settings: Settings, adding_bytes: int = 0
) -> None:
    """Raise when one more job (storing `adding_bytes` now) would pass a limit.

    Takes the tenant's row lock first (`lock_tenant`): the caller inserts the job and commits
    in this transaction, or rolls back when this raises."""
    limits = limits_of(tenant, settings)
    if limits.active_jobs or limits.stored_bytes:
        lock_tenant(session, tenant.id)
    if limits.active_jobs:
        active = active_jobs(session, tenant.id)
        if active >= limits.active_jobs:
            raise TooManyRequests(
                f"active jobs limit reached: this tenant has {active} queued or running jobs, "
                f"the limit is {limits.active_jobs}; wait for some to finish or cancel them",
                retry_after_s=RETRY_AFTER_QUOTA_S,
            )
    _check_bytes(session, tenant, limits, adding_bytes)


def _check_bytes(session: Session, tenant: Tenant, limits: Limits, adding_bytes: int) -> None:
    if not limits.stored_bytes:
        return
    used = stored_bytes(session, tenant.id)
    # An export's size is known only once a worker made it: one is refused when the tenant is
    # already at its limit (`adding_bytes` 0 then, so `>=`).
    if used + adding_bytes > limits.stored_bytes or used >= limits.stored_bytes:
        raise TooManyRequests(
            f"stored bytes limit reached: this tenant stores {used} bytes, this request "
            f"adds {adding_bytes or 'more'}, the limit is {limits.stored_bytes}; delete "
            "fine-tunes, adapters, exports or generations first",
            retry_after_s=RETRY_AFTER_QUOTA_S,
        )


def check_new_bytes(
    *, session: Session, tenant: Tenant, settings: Settings, adding_bytes: int
) -> None:
    """Raise when storing `adding_bytes` more (an uploaded adapter) would pass the stored
    bytes limit. Takes the tenant's row lock like `check_new_job`; the caller inserts the row
    and commits in this transaction."""
    limits = limits_of(tenant, settings)
    if limits.stored_bytes:
        lock_tenant(session, tenant.id)
    _check_bytes(session, tenant, limits, adding_bytes)


def check_new_export(*, session: Session, tenant: Tenant, settings: Settings) -> None:
    """Raise when one more export variant would pass the export or the stored bytes limit.

    Like `check_new_job`, takes the tenant's row lock; the caller inserts and commits."""
    limits = limits_of(tenant, settings)
    if not (limits.exports or limits.stored_bytes):
        return
    lock_tenant(session, tenant.id)
    if limits.exports:
        count = int(
            session.scalar(
                select(func.count())
                .select_from(AdapterExport)
                .where(AdapterExport.tenant_id == tenant.id)
            )
            or 0
        )
        if count >= limits.exports:
            raise TooManyRequests(
                f"exports limit reached: this tenant stores {count} export variants, the "
                f"limit is {limits.exports} (TUNEQDM_TENANT_EXPORTS); delete an adapter's "
                "exports (DELETE /v1/adapters/{id}) first",
                retry_after_s=RETRY_AFTER_QUOTA_S,
            )
    _check_bytes(session, tenant, limits, 0)
