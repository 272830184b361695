"""Adapter exports: ask a worker for a LoRA file or a merged UNet, then download it.

The API cannot build either (no torch here), so `create_export` stores a row and enqueues the
worker task; asking again for the same variant returns the same row (re-queued when it failed,
or when its worker went quiet for TUNEQDM_STALE_AFTER_S). `export_file` serves a finished one.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput, NotFound
from app.ids import new_id
from app.models import AdapterExport, Tenant, utcnow
from app.queue import EXPORT_TASK, GENERATE_QUEUE, TaskSender, base_queue
from app.schemas import ExportCreate
from app.services import quotas
from app.services.adapters import get_adapter
from app.settings import Settings

log = logging.getLogger(__name__)


def _check(data: ExportCreate, intervals: int, settings: Settings) -> None:
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


def create_export(
    *,
    session: Session,
    sender: TaskSender,
    settings: Settings,
    tenant: Tenant,
    adapter_id: str,
    data: ExportCreate,
) -> tuple[AdapterExport, bool]:
    """The export row of this variant and whether it was (re)queued by this call."""
    adapter = get_adapter(session=session, tenant=tenant, adapter_id=adapter_id)
    _check(data, adapter.intervals, settings)
    row = session.scalar(
        select(AdapterExport).where(
            AdapterExport.adapter_id == adapter.id, AdapterExport.variant == data.variant
        )
    )
    stale = utcnow() - timedelta(seconds=settings.stale_after_s)
    if row is not None and (
        row.status in ("queued", "succeeded")
        or (row.status == "running" and row.updated_at > stale)
    ):
        return row, False
    created = row is None
    if row is None:
        quotas.check_new_export(session=session, tenant=tenant, settings=settings)
        row = AdapterExport(
            id=new_id("exp"),
            tenant_id=tenant.id,
            adapter_id=adapter.id,
            variant=data.variant,
            format=data.format,
            rank=data.rank,
            interval=data.interval,
        )
        session.add(row)
    row.status, row.error, row.finished_at = "queued", None, None
    session.commit()
    try:
        # Made by a worker of the adapter's base.
        sender.send(EXPORT_TASK, row.id, queue=base_queue(GENERATE_QUEUE, adapter.base_model))
    except Exception:
        log.exception("enqueue of export %s failed", row.id)
        if created:  # nothing stays behind, as the 503 says
            session.delete(row)
        else:
            row.status, row.error = "failed", "the task queue was not reachable; ask again"
        session.commit()
        raise
    return row, True


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
    *, session: Session, tenant: Tenant, adapter_id: str, data: ExportCreate
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
