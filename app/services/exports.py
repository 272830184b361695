"""Adapter exports: ask a worker for a LoRA file or a merged UNet, then download it.

The API cannot build either (no torch here), so `create_export` stores a row and enqueues the
worker task; asking again for the same variant returns the same row (re-queued when it failed
or was canceled). An export is a job like a fine-tune or a generation (lease, attempts, stale
sweep, reconciler: docs/workers.md). `export_file` serves a finished one.
"""

from __future__ import annotations

import logging

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.families import EXPORT_FORMATS
from app.ids import new_id
from app.models import ACTIVE_STATUSES, AdapterExport, ServedBase, Tenant, utcnow
from app.outbox import check_events, chosen_events, record_final
from app.queue import EXPORT_TASK, GENERATE_QUEUE, TaskSender, base_queue
from app.schemas import ExportCreate, ExportVariant
from app.services import quotas
from app.services.adapters import get_adapter
from app.settings import Settings
from app.webhooks import check_webhook_url

log = logging.getLogger(__name__)


def _check_format(session: Session, data: ExportVariant, base: str) -> None:
    """The formats of the adapter's base family (app/families.py); an adapter of a base no
    longer in the registry is left to its worker."""
    row = session.get(ServedBase, base)
    if row is None:
        return
    formats = EXPORT_FORMATS[row.family]  # type: ignore[index]
    if data.format not in formats:
        raise InvalidInput(
            f"format={data.format!r} is not available for adapters of base {base!r} (family "
            f"{row.family}); ask for one of {', '.join(map(repr, formats))}",
            field="format",
        )


def _check(data: ExportVariant, intervals: int, settings: Settings) -> None:
    if data.rank is not None and data.rank > settings.max_export_rank:
        raise InvalidInput(
            f"rank {data.rank} is above this service's largest export rank "
            f"({settings.max_export_rank}, TUNEQDM_MAX_EXPORT_RANK)"
        )
    if data.interval != "mean" and int(data.interval) >= intervals:
        raise InvalidInput(
            f"interval {data.interval} does not exist: this adapter has {intervals} "
            f"interval(s), 0 to {intervals - 1}; or use 'mean'"
        )


def _webhook(data: ExportCreate, settings: Settings) -> tuple[str | None, list[str] | None]:
    """The request's webhook_url (checked like a fine-tune's) and webhook_events."""
    url = None
    if data.webhook_url is not None and data.webhook_url.strip():
        url = check_webhook_url(
            data.webhook_url.strip(),
            allow_private=settings.allow_private_webhooks,
            ports=settings.webhook_ports,
        )
    return url, check_events("export", data.webhook_events, webhook_url=url)


def _check_shared_webhook(row: AdapterExport, url: str | None, events: list[str] | None) -> None:
    """A request for an export already queued, running or succeeded shares that export: it may
    repeat the export's webhook or name none, not another (only the request that queues an
    export sets its webhook)."""
    if url is None:
        return
    fix = (
        f"export {row.id} of this variant is already {row.status} and only the request that "
        "queued it sets its webhook; leave webhook_url and webhook_events out to share it"
    )
    if url != row.webhook_url:
        has = "no webhook" if row.webhook_url is None else "another webhook_url"
        raise Conflict(f"webhook_url: {fix} (it has {has})", field="webhook_url")
    if (events or chosen_events(row)) != chosen_events(row):
        raise Conflict(
            f"webhook_events: {fix} (its events are {', '.join(chosen_events(row))})",
            field="webhook_events",
        )


def create_export(
    *,
    session: Session,
    sender: TaskSender,
    settings: Settings,
    tenant: Tenant,
    adapter_id: str,
    data: ExportCreate,
) -> tuple[AdapterExport, bool]:
    """The export row of this variant and whether this call (re)queued it. A queued export
    gets one more message (its own may have been lost: a broker restarted without its data;
    a message too many finds nothing to claim); a running one is its worker's (a dead
    worker's is given back by the workers' stale sweep); a failed or canceled one is queued
    again as a new request, with its attempts from zero and this request's webhook.
    Conflict when a request names another webhook than the export it shares has."""
    adapter = get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    _check(data, adapter.intervals, settings)
    _check_format(session, data, adapter.base_model)
    webhook_url, webhook_events = _webhook(data, settings)
    row = session.scalar(
        select(AdapterExport).where(
            AdapterExport.adapter_id == adapter.id, AdapterExport.variant == data.variant
        )
    )
    queue = base_queue(GENERATE_QUEUE, adapter.base_model)  # a worker of the adapter's base
    if row is not None and row.status in ("queued", "running", "succeeded"):
        _check_shared_webhook(row, webhook_url, webhook_events)
    if row is not None and row.status in ("running", "succeeded"):
        return row, False
    if row is not None and row.status == "queued":
        try:
            sender.send(EXPORT_TASK, row.id, queue=queue)
        except Exception:
            # Still queued: the workers' reconciler sends its message once the broker is back.
            log.exception("could not send export %s again", row.id)
        return row, False
    created = row is None
    if row is None:
        quotas.check_new_export(session=session, tenant=tenant, settings=settings)
        row = AdapterExport(
            id=new_id("exp"),
            tenant_id=tenant.id,
            adapter_id=adapter.id,
            base_model=adapter.base_model,
            variant=data.variant,
            format=data.format,
            rank=data.rank,
            interval=data.interval,
        )
        session.add(row)
    row.status, row.error, row.finished_at, row.attempts = "queued", None, None, 0
    row.lease_owner = row.heartbeat_at = None
    row.webhook_url, row.webhook_events = webhook_url, webhook_events
    session.commit()
    try:
        sender.send(EXPORT_TASK, row.id, queue=queue)
    except Exception:
        log.exception("enqueue of export %s failed", row.id)
        if created:  # nothing stays behind, as the 503 says
            session.delete(row)
        else:
            row.status, row.error = "failed", "the task queue was not reachable; ask again"
        session.commit()
        raise
    return row, True


def cancel_export(
    *, session: Session, tenant: Tenant, adapter_id: str, export_id: str
) -> AdapterExport:
    """Cancel a queued or running export (a running one stops before its file is stored);
    Conflict when it has already ended."""
    adapter = get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    row = session.scalar(
        select(AdapterExport).where(
            AdapterExport.id == export_id, AdapterExport.adapter_id == adapter.id
        )
    )
    if row is None:
        raise NotFound(f"adapter {adapter_id} has no export {export_id}")
    now = utcnow()
    # Conditional, so a worker finishing it at the same moment is not overwritten.
    result = session.execute(
        update(AdapterExport)
        .where(AdapterExport.id == row.id, AdapterExport.status.in_(ACTIVE_STATUSES))
        .values(status="canceled", finished_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        record_final(session, AdapterExport, row.id)  # commits with the canceled state
    session.commit()
    session.refresh(row)
    if not result.rowcount:  # type: ignore[attr-defined]
        raise Conflict(
            f"export {row.id} is already {row.status}; only queued or running exports can be "
            "canceled"
        )
    return row


def list_exports(*, session: Session, tenant: Tenant, adapter_id: str) -> list[AdapterExport]:
    adapter = get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    return list(
        session.scalars(
            select(AdapterExport)
            .where(AdapterExport.adapter_id == adapter.id)
            .order_by(AdapterExport.created_at, AdapterExport.id)
        )
    )


def export_file(
    *, session: Session, tenant: Tenant, adapter_id: str, data: ExportVariant
) -> AdapterExport:
    """The finished export of this variant; NotFound when never asked for, Conflict while it
    runs or after it failed."""
    adapter = get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    row = session.scalar(
        select(AdapterExport).where(
            AdapterExport.adapter_id == adapter.id, AdapterExport.variant == data.variant
        )
    )
    what = f"{data.format} export (variant {data.variant})"
    if row is None:
        raise NotFound(
            f"no {what} of adapter {adapter_id}; create it with POST "
            f"/v1/adapters/{adapter_id}/exports"
        )
    if row.status == "failed":
        raise Conflict(f"the {what} failed: {row.error}; POST the same request again to retry")
    if row.status != "succeeded" or row.storage_key is None:
        raise Conflict(
            f"the {what} is {row.status}; download it when GET "
            f"/v1/adapters/{adapter_id}/exports shows it succeeded"
        )
    return row
