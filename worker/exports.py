"""Export rows → `tuneqdm_core.export` → a LoRA file or a merged UNet in storage.

An export is a job like the others (worker/context.py, worker/jobs.py): its message is a token
that claims the fairest queued export of this worker's base, under a lease with a heartbeat;
attempts are counted and capped; a worker that dies mid-export leaves a stale lease that the
sweep gives back, and the reconciler re-sends a message that was lost. The file is stored
under the row's lock while the lease holds (`while_owned`), so an export canceled or deleted
meanwhile gets no file; one canceled while it runs stops at that point.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from app import storage as st
from app.models import Adapter, AdapterExport
from app.outbox import record_final
from app.schemas.exports import variant_max_relative_error
from worker import metrics
from worker.context import Context, end, unclaimed, while_owned
from worker.failures import transient_reason, user_message
from worker.jobs import Lease, attempts_exhausted, finish_owned, new_owner

log = logging.getLogger(__name__)


def _fail(ctx: Context, export_id: str, owner: str, message: str) -> str:
    if end(ctx, AdapterExport, export_id, owner, "failed", error=message):
        log.warning("export %s failed: %s", export_id, message)
    return "failed"


def run_export(export_id: str, ctx: Context) -> str:
    """Make the fairest queued export (`export_id` is the message's); returns what happened."""
    while True:
        with ctx.sessions() as session:
            owner = new_owner()
            claimed = ctx.claim_next(session, AdapterExport, owner, hint=export_id)
            if claimed is None:
                return unclaimed(session, AdapterExport, export_id)
            claimed_id, attempt = claimed
            row = session.get(AdapterExport, claimed_id)
            assert row is not None
            session.refresh(row)
            adapter = session.get(Adapter, row.adapter_id)
            session.expunge_all()
        log.info("export %s claimed (attempt %d)", claimed_id, attempt)
        exhausted = attempts_exhausted(attempt, ctx.settings.max_attempts, row.error)
        if exhausted is None:
            return _run_claimed(ctx, row, adapter, owner)
        # This token is not spent yet: fail the export and look for the next one.
        _fail(ctx, row.id, owner, exhausted)


def _run_claimed(ctx: Context, row: AdapterExport, adapter: Adapter | None, owner: str) -> str:
    if adapter is None:  # deleted with its exports meanwhile: nothing to end
        return "missing"
    if adapter.base_model != ctx.settings.base_model:
        return _fail(
            ctx,
            row.id,
            owner,
            f"this service now runs base model {ctx.settings.base_model!r}, the adapter was "
            f"trained on {adapter.base_model!r}; it cannot be exported here",
        )
    key = st.export_key(row.tenant_id, row.id)
    begun = time.perf_counter()
    outcome = _make(ctx, row, adapter, owner, key)
    if outcome in ("succeeded", "failed"):
        metrics.export_done(
            ctx.settings.base_model, row.format, outcome, time.perf_counter() - begun
        )
    return outcome


def _make(ctx: Context, row: AdapterExport, adapter: Adapter, owner: str, key: str) -> str:
    with ctx.lease(AdapterExport, row.id, owner) as lease:
        path = ctx.files.output(key)
        try:
            summary = _write(ctx, row, adapter, path, lease)
            if not _publish(ctx, row, key, path.stat().st_size, summary, lease):
                return "stopped (canceled, deleted or taken over)"
        except Exception as exc:
            ctx.files.discard(key)
            path.unlink(missing_ok=True)
            reason = transient_reason(exc)
            if reason is not None:
                log.warning("export %s hit a transient fault", row.id, exc_info=exc)
                ctx.release(AdapterExport, row.id, owner, reason)
                return "released"
            log.exception("export %s raised", row.id)
            return _fail(
                ctx, row.id, owner, user_message(exc, storage_root=ctx.files.root, what="export")
            )
    return "succeeded"


def _publish(
    ctx: Context, row: AdapterExport, key: str, size: int, summary: dict[str, Any], lease: Lease
) -> bool:
    """Store the file and mark the export succeeded, with its webhook row, in one transaction
    under the row's lock, only while the lease holds; otherwise the written file goes."""
    published, delivery = False, None
    with while_owned(ctx, lease) as session:
        if session is not None:
            ctx.files.publish(key)
            finish_owned(
                session,
                AdapterExport,
                row.id,
                lease.owner,
                "succeeded",
                error=None,
                storage_key=key,
                size_bytes=size,
                relative_error=summary.get("relative_error"),
            )
            delivery = record_final(session, AdapterExport, row.id)
            published = True
    if delivery is not None:
        ctx.notify(row.id)  # committed with the succeeded state above
    if published:
        return True
    ctx.files.discard(key)
    if isinstance(ctx.files.storage, st.LocalStorage):
        ctx.files.path(key).unlink(missing_ok=True)  # written in place
    return False


def _write(
    ctx: Context, row: AdapterExport, adapter: Adapter, path: Any, lease: Lease
) -> dict[str, Any]:
    from tuneqdm_core.export import (
        ExportOptions,
        export_adapter,
        load_float_pipeline,
        load_float_unet,
    )

    base = ctx.runtime.base
    lease.touch()  # loading the base may take long; each stage is progress
    loaded = ctx.files.adapter(ctx.runtime, adapter.id, adapter.storage_key)
    options = ExportOptions(
        format=row.format,  # type: ignore[arg-type]
        rank=row.rank,
        interval="mean" if row.interval == "mean" else int(row.interval),
        # A merged model is for running, where SD tools use half precision: half the bytes.
        fp16=row.format in ("merged", "merged-checkpoint"),
        max_relative_error=variant_max_relative_error(row.variant),
    )
    extra = {
        "adapter": adapter.id,
        "tokens": list(adapter.tokens),
        "base_model": adapter.base_model,
    }
    family = base.family
    if family.denoiser == "transformer":
        # A transformer family (as `tuneqdm export`): its float transformer, the LoRA key
        # prefix its pipeline's load_lora_weights reads, and the share of training each
        # interval had (the "mean" interval's weights). The API offers it lora and merged.
        if row.format not in ("lora", "merged"):
            raise ValueError(f"a {family.name} base exports as lora or merged, not {row.format}")
        float_model = family.load_float(base.source, ctx.settings.single_file_config)
        lease.touch()
        return export_adapter(
            base.unet,
            float_model,
            loaded,
            path,
            options,
            extra=extra,
            prefix=family.lora_prefix,
            shares=family.interval_shares(base, loaded.config.intervals),
        )
    # The float weights the base was quantized from, read for this export only (CPU); the
    # whole pipeline for a merged checkpoint.
    pipeline = load_float_pipeline(base.source) if row.format == "merged-checkpoint" else None
    float_unet = pipeline.unet if pipeline is not None else load_float_unet(base.source)
    lease.touch()
    summary = export_adapter(
        base.unet, float_unet, loaded, path, options, extra=extra, pipeline=pipeline
    )
    lease.touch()
    return summary
