"""The webhook outbox: a delivery row written in the same transaction as the event it tells.

Jobs here are fine-tunes, generations and exports. Every place that moves a job to
succeeded/failed/canceled (the worker's finish paths, the API's cancel) calls `record_final`
before its commit, so the job's final state, its webhook and (for a fine-tune) its event-log
entry commit together or not at all. The other events a job may ask for in `webhook_events`
(running, progress, samples) are recorded the same way with `record_webhook`, in the
transaction of the claim, the progress write or the progress images. Each of these
transactions holds the job's row lock (its UPDATE), so the deliveries of one job are numbered
(`sequence`) in the order their events committed; worker/webhooks.py sends a delivery only once
the job's earlier ones are no longer pending. Shared by app and worker: no FastAPI.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.db import database_now
from app.errors import InvalidInput
from app.events import record_event
from app.ids import new_id
from app.models import (
    FINAL_EVENTS,
    KIND_WEBHOOK_EVENTS,
    WEBHOOK_EVENTS,
    Adapter,
    AdapterExport,
    FinetuneJob,
    GenerationJob,
    WebhookDelivery,
    utcnow,
)

JobModel = type[FinetuneJob] | type[GenerationJob] | type[AdapterExport]
Job = FinetuneJob | GenerationJob | AdapterExport


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


def export_data(job: AdapterExport) -> dict[str, Any]:
    """The export as GET /v1/adapters/{id}/exports shows it."""
    # Here, not at the top: app.schemas imports this module.
    from app.schemas.exports import ExportPublic

    return ExportPublic.from_row(job).model_dump(mode="json")


def _kind(job: Job) -> str:
    if isinstance(job, FinetuneJob):
        return "finetune"
    return "generation" if isinstance(job, GenerationJob) else "export"


def _data(session: Session, job: Job) -> dict[str, Any]:
    if isinstance(job, FinetuneJob):
        return finetune_data(session, job)
    return generation_data(job) if isinstance(job, GenerationJob) else export_data(job)


def check_events(
    kind: str, events: list[str] | None, *, webhook_url: str | None
) -> list[str] | None:
    """The `webhook_events` a `kind` of job asked for, in their fixed order without repeats;
    None (the final states only) when none were named. InvalidInput names an unknown event or
    one that does not happen to this kind."""
    if not events:
        return None
    allowed = KIND_WEBHOOK_EVENTS[kind]
    a_kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    for i, event in enumerate(events):
        field = f"webhook_events[{i}]"
        if event not in WEBHOOK_EVENTS:
            raise InvalidInput(
                f"{field}: unknown event {event!r}; use {', '.join(WEBHOOK_EVENTS)}", field=field
            )
        if event not in allowed:
            raise InvalidInput(
                f"{field}: {a_kind} has no {event!r} event; {a_kind} can send {', '.join(allowed)}",
                field=field,
            )
    if webhook_url is None:
        raise InvalidInput(
            "webhook_events needs a webhook_url to send them to", field="webhook_events"
        )
    return [e for e in allowed if e in events]


def chosen_events(job: Job) -> list[str]:
    """The events the job gets webhooks for: what it asked for, else the final states."""
    return list(job.webhook_events) if job.webhook_events else list(FINAL_EVENTS)


def record_webhook(
    session: Session,
    model: JobModel,
    job_id: str,
    event: str,
    *,
    every_s: float = 0.0,
    **extra: Any,
) -> str | None:
    """Add the delivery of `event` (uncommitted, in `session`, whose transaction holds the
    job's row lock) when the job has a webhook_url and asked for the event; its id, or None.
    `every_s`: none when the job's last delivery of this event is younger (progress), by the
    database's clock. `extra` joins the payload's data (e.g. the progress images)."""
    session.flush()
    job: Job | None = session.get(model, job_id, populate_existing=True)  # type: ignore[assignment]
    if job is None or not job.webhook_url or event not in chosen_events(job):
        return None
    kind = _kind(job)
    now = database_now(session)
    if every_s > 0:
        last = session.scalar(
            select(func.max(WebhookDelivery.created_at)).where(
                WebhookDelivery.job_id == job.id, WebhookDelivery.event == f"{kind}.{event}"
            )
        )
        if last is not None and last > now - timedelta(seconds=every_s):
            return None
    data = _data(session, job)
    data.update(extra)
    last_sequence = session.scalar(
        select(func.max(WebhookDelivery.sequence)).where(WebhookDelivery.job_id == job.id)
    )
    delivery = WebhookDelivery(
        id=new_id("msg"),
        tenant_id=job.tenant_id,
        job_kind=kind,
        job_id=job.id,
        sequence=0 if last_sequence is None else last_sequence + 1,
        url=job.webhook_url,
        event=f"{kind}.{event}",
        # The Standard Webhooks envelope: type, timestamp, data.
        payload={"type": f"{kind}.{event}", "timestamp": utcnow().isoformat(), "data": data},
        status="pending",
        attempts=0,
        # Due now by the database's clock, which the senders compare with (worker/webhooks.py).
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    return delivery.id


def record_final(session: Session, model: JobModel, job_id: str) -> str | None:
    """Add the webhook delivery of a job that has just reached its final state (uncommitted,
    in `session`); returns its id, or None when the job has no webhook_url."""
    session.flush()
    job: Job | None = session.get(model, job_id, populate_existing=True)  # type: ignore[assignment]
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
    if job is None:
        return None
    return record_webhook(session, model, job_id, job.status)
