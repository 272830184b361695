"""People's data: what is deleted, when, and on whose request (docs/api.md, "What is kept").

- Subject photos and checkpoints of a fine-tune are deleted when the job ends (the worker calls
  `finetune_ended`), or TUNEQDM_PHOTO_RETENTION_S later (the sweep).
- Generations (row, prompt, images) are deleted TUNEQDM_GENERATION_RETENTION_S after they end.
- `sweep` does both for everything that is due, so a worker that died before its hook ran, or a
  retention period, is handled; every API process runs it on a timer (app/main.py) and
  `tuneqdm-admin sweep` runs it once.
- Progress images of a fine-tune, its kept checkpoints (params.keep_checkpoints) and its event
  log stay until the fine-tune is deleted.
- `delete_finetune`, `delete_generation` and `purge_tenant` delete on request.

Import-safe for the worker (no FastAPI). Files go before rows: a row whose files are gone only
answers "deleted"; a file whose row is gone would be a photo nobody can find to delete.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.logs import audit
from app.models import (
    ACTIVE_STATUSES,
    Adapter,
    AdapterExport,
    FinetuneImage,
    FinetuneJob,
    GenerationJob,
    Tenant,
    utcnow,
)
from app.settings import Settings

log = logging.getLogger(__name__)

FINAL_STATUSES = ("succeeded", "failed", "canceled")


def drop_finetune_files(session: Session, storage: st.Storage, job: FinetuneJob) -> None:
    """Delete a fine-tune's photos and checkpoints (files, then photo rows); caller commits."""
    storage.delete_prefix(st.finetune_prefix(job.tenant_id, job.id))
    session.execute(delete(FinetuneImage).where(FinetuneImage.job_id == job.id))
    session.execute(
        update(FinetuneJob)
        .where(FinetuneJob.id == job.id, FinetuneJob.photos_deleted_at.is_(None))
        .values(photos_deleted_at=utcnow())
        .execution_options(synchronize_session=False)
    )


def finetune_ended(
    sessions: sessionmaker[Session],
    storage: st.Storage,
    settings: Settings,
    tenant_id: str,
    job_id: str,
) -> None:
    """Called by the worker once a fine-tune reached a final state (or was deleted)."""
    try:
        with sessions() as session:
            after_finetune_end(session, storage, settings, tenant_id, job_id)
    except Exception:
        # The sweep tries again; a failure here must not fail the job.
        log.exception("could not delete the photos of fine-tune %s; the sweep will", job_id)


def after_finetune_end(
    session: Session, storage: st.Storage, settings: Settings, tenant_id: str, job_id: str
) -> None:
    """Photos and checkpoints go now unless a retention period keeps them (then the sweep
    deletes them later); commits."""
    job = session.get(FinetuneJob, job_id)
    if job is None:
        # Deleted while it ran: the API removed the files it knew of, the worker may have
        # written a checkpoint or progress images since.
        storage.delete_prefix(st.finetune_prefix(tenant_id, job_id))
        storage.delete_prefix(st.finetune_samples_prefix(tenant_id, job_id))
        storage.delete_prefix(st.finetune_checkpoints_prefix(tenant_id, job_id))
        return
    if job.status not in FINAL_STATUSES or settings.photo_retention_s > 0:
        return
    drop_finetune_files(session, storage, job)
    session.commit()


def discard_generation_files(storage: st.Storage, tenant_id: str, generation_id: str) -> None:
    """A worker wrote images for a generation that was deleted (or taken from it) meanwhile."""
    try:
        storage.delete_prefix(st.generation_prefix(tenant_id, generation_id))
    except Exception:
        log.exception("could not remove the images of generation %s", generation_id)


def _cancel_active(
    session: Session, model: type[FinetuneJob] | type[GenerationJob], *where: object
) -> int:
    now = utcnow()
    values = {"status": "canceled", "finished_at": now, "updated_at": now}
    if model is FinetuneJob:
        values["group_size"] = None  # it leaves its co-training group
    result = session.execute(
        update(model)
        .where(model.status.in_(ACTIVE_STATUSES), *where)  # type: ignore[arg-type]
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def delete_finetune(
    *, session: Session, storage: st.Storage, job: FinetuneJob, delete_adapter: bool
) -> None:
    """Cancel the job if it is active, then delete its files and its row (and its adapter
    when asked; otherwise the adapter stays, without a link to the job)."""
    _cancel_active(session, FinetuneJob, FinetuneJob.id == job.id)
    session.commit()  # a running worker stops at its next lease write
    storage.delete_prefix(st.finetune_prefix(job.tenant_id, job.id))
    storage.delete_prefix(st.finetune_samples_prefix(job.tenant_id, job.id))
    storage.delete_prefix(st.finetune_checkpoints_prefix(job.tenant_id, job.id))
    adapter_key = None
    adapter = session.scalar(select(Adapter).where(Adapter.finetune_job_id == job.id))
    if delete_adapter and adapter is not None:
        adapter_key = adapter.storage_key
        exports = session.scalars(
            select(AdapterExport).where(AdapterExport.adapter_id == adapter.id)
        )
        for key in [adapter_key] + [e.storage_key for e in exports if e.storage_key]:
            storage.delete(key)
        session.delete(adapter)  # its export rows go with it (ON DELETE CASCADE)
    session.delete(job)  # its sample, checkpoint and event rows go with it (ON DELETE CASCADE)
    session.commit()
    audit(
        "finetune.delete",
        tenant_id=job.tenant_id,
        finetune_id=job.id,
        adapter_id=adapter.id if adapter is not None else None,
        adapter_deleted=adapter_key is not None,
    )


def delete_generation(*, session: Session, storage: st.Storage, gen: GenerationJob) -> None:
    _cancel_active(session, GenerationJob, GenerationJob.id == gen.id)
    session.commit()
    storage.delete_prefix(st.generation_prefix(gen.tenant_id, gen.id))
    session.delete(gen)
    session.commit()
    audit("generation.delete", tenant_id=gen.tenant_id, generation_id=gen.id)


def purge_tenant(*, session: Session, storage: st.Storage, tenant: Tenant) -> None:
    """Everything of a tenant: its jobs are canceled, its files and all its rows (keys, jobs,
    photos, adapters, generations, the tenant itself) deleted."""
    for model in (FinetuneJob, GenerationJob):
        _cancel_active(session, model, model.tenant_id == tenant.id)
    session.commit()
    storage.delete_prefix(st.tenant_prefix(tenant.id))
    # The foreign keys cascade from the tenant to every row that names it.
    session.execute(delete(Tenant).where(Tenant.id == tenant.id))
    session.commit()
    # A worker that was writing when the jobs were canceled may have added a file since.
    storage.delete_prefix(st.tenant_prefix(tenant.id))
    audit("tenant.purge", tenant_id=tenant.id)


@dataclass
class SweepResult:
    photos: int = 0  # fine-tunes whose photos were deleted
    generations: int = 0  # generations deleted


def sweep(
    *,
    sessions: sessionmaker[Session],
    storage: st.Storage,
    settings: Settings,
    now: datetime | None = None,
) -> SweepResult:
    """Delete what is due: photos of ended fine-tunes, expired generations."""
    now = now or utcnow()
    result = SweepResult()
    with sessions() as session:
        cutoff = now - timedelta(seconds=settings.photo_retention_s)
        jobs = session.scalars(
            select(FinetuneJob).where(
                FinetuneJob.status.in_(FINAL_STATUSES),
                FinetuneJob.photos_deleted_at.is_(None),
                FinetuneJob.finished_at <= cutoff,
            )
        ).all()
        for job in jobs:
            drop_finetune_files(session, storage, job)
            session.commit()
            result.photos += 1
        if settings.generation_retention_s > 0:
            cutoff = now - timedelta(seconds=settings.generation_retention_s)
            gens = session.scalars(
                select(GenerationJob).where(
                    GenerationJob.status.in_(FINAL_STATUSES), GenerationJob.finished_at <= cutoff
                )
            ).all()
            for gen in gens:
                storage.delete_prefix(st.generation_prefix(gen.tenant_id, gen.id))
                session.delete(gen)
                session.commit()
                result.generations += 1
    if result.photos or result.generations:
        log.info(
            "retention sweep: photos of %d fine-tune(s), %d generation(s) deleted",
            result.photos,
            result.generations,
            extra={"photos": result.photos, "generations": result.generations},
        )
    return result
