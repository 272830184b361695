"""The webhook outbox: a delivery row written in the same transaction as a job's final state.

Every place that moves a job to succeeded/failed/canceled (the worker's finish paths, the API's
cancel) calls `record_final` before its commit, so the job's final state, its webhook and (for
a fine-tune) its event-log entry commit together or not at all; worker/webhooks.py sends the
rows. Shared by app and worker: no FastAPI.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import database_now
from app.events import record_event
from app.ids import new_id
from app.models import Adapter, FinetuneJob, GenerationJob, WebhookDelivery, utcnow

JobModel = type[FinetuneJob] | type[GenerationJob]


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def finetune_data(session: Session, job: FinetuneJob) -> dict[str, Any]:
    adapter_id = session.scalar(select(Adapter.id).where(Adapter.finetune_job_id == job.id))
    return {
        "id": job.id,
        "status": job.status,
        "adapter_id": adapter_id,
        "error": job.error,
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "finished_at": _iso(job.finished_at),
    }


def generation_data(job: GenerationJob) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "adapter_id": job.adapter_id,
        "error": job.error,
        "images": [
            {
                "index": i.index,
                "seed": i.seed,
                "base": i.base,
                "url": f"/v1/generations/{job.id}/images/{i.index}",
            }
            for i in job.images
        ],
        "finished_at": _iso(job.finished_at),
    }


def record_final(session: Session, model: JobModel, job_id: str) -> str | None:
    """Add the webhook delivery of a job that has just reached its final state (uncommitted,
    in `session`); returns its id, or None when the job has no webhook_url."""
    session.flush()
    job: FinetuneJob | GenerationJob | None = session.get(  # type: ignore[assignment]
        model, job_id, populate_existing=True
    )
    if isinstance(job, FinetuneJob):
        # The event log's final entry, under the row lock of the caller's UPDATE.
        data = finetune_data(session, job)
        record_event(
            session,
            job.id,
            job.status,
            step=job.progress_step,
            error=job.error,
            adapter_id=data["adapter_id"],
        )
    if job is None or not job.webhook_url:
        return None
    kind = "finetune" if isinstance(job, FinetuneJob) else "generation"
    data = finetune_data(session, job) if isinstance(job, FinetuneJob) else generation_data(job)
    delivery = WebhookDelivery(
        id=new_id("msg"),
        tenant_id=job.tenant_id,
        job_kind=kind,
        job_id=job.id,
        url=job.webhook_url,
        event=f"{kind}.{job.status}",
        # The Standard Webhooks envelope: type, timestamp, data.
        payload={"type": f"{kind}.{job.status}", "timestamp": utcnow().isoformat(), "data": data},
        status="pending",
        attempts=0,
        # Due now by the database's clock, which the senders compare with (worker/webhooks.py).
        next_attempt_at=database_now(session),
    )
    session.add(delivery)
    return delivery.id
