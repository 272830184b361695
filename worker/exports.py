"""Export rows → `tuneqdm_core.export` → a LoRA file or a merged UNet in storage.

An export is short and idempotent (same adapter, same variant, same bytes), so it keeps no
lease: it is claimed with one conditional UPDATE (queued → running) and finished with another
(running → succeeded/failed). A worker that dies mid-export leaves the row running; asking for
the same export again re-queues it once TUNEQDM_STALE_AFTER_S passed (app/services/exports.py),
and two runs of one export would write the same file by rename.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from app import storage as st
from app.models import Adapter, AdapterExport, utcnow
from worker import metrics
from worker.failures import user_message
from worker.finetunes import Context

log = logging.getLogger(__name__)


def _set(session: Session, export_id: str, status: str, **values: Any) -> bool:
    """Move a running export to ``status``; False when the row is gone or not running."""
    now = utcnow()
    result = session.execute(
        update(AdapterExport)
        .where(AdapterExport.id == export_id, AdapterExport.status == "running")
        .values(status=status, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _fail(ctx: Context, export_id: str, message: str) -> str:
    with ctx.sessions() as session:
        _set(session, export_id, "failed", error=message, finished_at=utcnow())
    log.warning("export %s failed: %s", export_id, message)
    return "failed"


def run_export(export_id: str, ctx: Context) -> str:
    """Make one export; returns what happened."""
    with ctx.sessions() as session:
        claimed = session.execute(
            update(AdapterExport)
            .where(AdapterExport.id == export_id, AdapterExport.status == "queued")
            .values(status="running", updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
        session.commit()
        if not claimed.rowcount:  # type: ignore[attr-defined]
            return "skipped (not queued)"
        row = session.get(AdapterExport, export_id)
        adapter = session.get(Adapter, row.adapter_id) if row is not None else None
        if row is None or adapter is None:
            return "skipped (adapter deleted)"
        session.expunge_all()
    base = ctx.settings.base_model
    metrics.job_started("export", base, 1, row.created_at, utcnow())
    begun = time.perf_counter()
    outcome = _make(ctx, row, adapter)
    status = "succeeded" if outcome == "succeeded" else "failed"
    if outcome != "discarded (row gone)":
        metrics.job_finished("export", base, status)
        metrics.export_done(base, row.format, status, time.perf_counter() - begun)
    return outcome


def _make(ctx: Context, row: AdapterExport, adapter: Adapter) -> str:
    export_id = row.id
    if adapter.base_model != ctx.settings.base_model:
        return _fail(
            ctx,
            export_id,
            f"this service now runs base model {ctx.settings.base_model!r}, the adapter was "
            f"trained on {adapter.base_model!r}; it cannot be exported here",
        )
    key = st.export_key(row.tenant_id, row.id)
    path = ctx.files.output(key)
    try:
        summary = _write(ctx, row, adapter, path)
        size = path.stat().st_size
        ctx.files.publish(key)
    except Exception as exc:
        log.exception("export %s raised", export_id)
        path.unlink(missing_ok=True)
        return _fail(ctx, export_id, user_message(exc, storage_root=ctx.files.root, what="export"))
    with ctx.sessions() as session:
        done = _set(
            session,
            export_id,
            "succeeded",
            storage_key=key,
            size_bytes=size,
            relative_error=summary.get("relative_error"),
            finished_at=utcnow(),
        )
    if not done:  # deleted with its adapter meanwhile: the file has no owner
        ctx.storage.delete(key)
        return "discarded (row gone)"
    return "succeeded"


def _write(ctx: Context, row: AdapterExport, adapter: Adapter, path: Any) -> dict[str, Any]:
    from tuneqdm_core.export import ExportOptions, export_adapter, load_float_unet

    base = ctx.runtime.base
    loaded = ctx.files.adapter(ctx.runtime, adapter.id, adapter.storage_key)
    options = ExportOptions(
        format=row.format,  # type: ignore[arg-type]
        rank=row.rank or 1,  # unused by a merge
        interval="mean" if row.interval == "mean" else int(row.interval),
        # A merged UNet is for running, where SD tools use half precision: half the bytes.
        fp16=row.format == "merged",
    )
    # The float weights the base was quantized from, read for this export only (CPU).
    float_unet = load_float_unet(base.source)
    extra = {
        "adapter": adapter.id,
        "tokens": list(adapter.tokens),
        "base_model": adapter.base_model,
    }
    return export_adapter(base.unet, float_unet, loaded, path, options, extra=extra)
