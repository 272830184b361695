"""What a fine-tune's worker does the same whether the job trains alone (worker/finetunes.py)
or in a co-training group (worker/cotrain.py): turn stored params into the core's config,
refuse what this worker cannot serve, save checkpoints under the lease, publish the adapter,
and end the job (succeeded, failed, given back, stopped).
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from sqlalchemy import delete

from app.models import Adapter, FinetuneJob
from app.outbox import record_final
from app.schemas import FinetuneParams
from app.services.retention import finetune_ended
from app.settings import Settings
from worker.context import Context, end, while_owned
from worker.failures import transient_reason, user_message
from worker.files import adapter_attempt_key
from worker.jobs import SHUTDOWN, Lease, finish_owned

log = logging.getLogger(__name__)

BASE_FAILED = (
    "the service could not load its base model; the operator has been told (worker log), "
    "submit the job again later"
)


def adapter_id_for(job_id: str) -> str:
    # One adapter per job, the same id on every attempt (each attempt's file has its own name).
    return "ad_" + job_id.removeprefix("ft_")


def adapter_extra(job: FinetuneJob) -> dict[str, Any]:
    """The free metadata of a job's adapter files (the trained one and kept checkpoints)."""
    return {"tokens": [job.token], "instance_prompt": job.instance_prompt, "job": job.id}


def finetune_config(params: FinetuneParams, job_id: str) -> Any:
    """Stored API params → the core's FinetuneConfig: every field the two share is passed
    through by name (tests/worker/test_options.py checks names and defaults)."""
    from dataclasses import fields

    from tuneqdm_core.finetune import FinetuneConfig

    shared = {f.name for f in fields(FinetuneConfig)} & set(FinetuneParams.model_fields)
    values = {name: getattr(params, name) for name in shared}
    # A job without a seed still needs the same one on every attempt, or it cannot resume.
    values["seed"] = params.seed if params.seed is not None else zlib.crc32(job_id.encode())
    values["intervals"] = params.intervals or 1
    if params.resolution is None:
        # The API stores the base's native size; a row without one was not made by it.
        raise ValueError(f"fine-tune {job_id} has no resolution in its stored params")
    return FinetuneConfig(**values)


def refusal(params: FinetuneParams, settings: Settings) -> str | None:
    """Requests this worker cannot serve, refused before any GPU time is spent."""
    if params.method == "full":
        return (
            "method=full trains a whole float UNet, which the service cannot store or serve as "
            "an adapter; use method=tuneqdm or peqa"
        )
    if params.bits != settings.bits:
        return (
            f"this service's workers run a {settings.bits}-bit base, the job asks for "
            f"bits={params.bits}; submit it again with bits={settings.bits}"
        )
    return None


def save_checkpoint(ctx: Context, job: FinetuneJob, lease: Lease) -> bool:
    """Upload the step training saved last, only while the lease holds (worker/staging.py);
    False when it was lost."""
    return ctx.files.save_checkpoint(job.tenant_id, job.id, lambda: while_owned(ctx, lease))


def fail(ctx: Context, job: FinetuneJob, owner: str, message: str) -> None:
    if end(ctx, FinetuneJob, job.id, owner, "failed", error=message):
        log.warning("fine-tune %s failed: %s", job.id, message)
        finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)


def raised(ctx: Context, job: FinetuneJob, owner: str, exc: Exception) -> str:
    """A job that raised ``exc``: given back on a transient fault, else failed with a message
    the user can act on."""
    reason = transient_reason(exc)
    if reason is not None:
        log.warning("fine-tune %s hit a transient fault", job.id, exc_info=exc)
        ctx.release(FinetuneJob, job.id, owner, reason)
        return "released"
    log.error("fine-tune %s raised", job.id, exc_info=exc)
    fail(ctx, job, owner, user_message(exc, storage_root=ctx.files.root, what="fine-tune"))
    # A job canceled or deleted while it ran fails nothing above: its files still go.
    after_stop(ctx, job, None)
    return "failed"


def succeeded(ctx: Context, job: FinetuneJob, result: Any, how: str = "") -> str:
    """The end of a job whose adapter is published (alone or co-trained): its checkpoint goes,
    the client is told and retention hears of it."""
    ctx.files.drop_checkpoint(job.tenant_id, job.id)
    log.info(
        "fine-tune %s succeeded in %.1f s (resumed from step %d%s)",
        job.id,
        result.seconds,
        result.resumed_from,
        how,
    )
    ctx.notify(job.id)
    finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)
    return "succeeded"


def after_stop(ctx: Context, job: FinetuneJob, lease: Lease | None) -> str:
    """A run that stopped early: a canceled or deleted job drops its checkpoint and files (and
    a canceled one tells its webhook); a stopping worker gives the job back (not counted as an
    attempt) for the next worker to resume at once; a stalled one was given back by its
    watchdog; a taken-over one does nothing (its new worker continues from the checkpoint)."""
    if lease is not None and lease.stalled.is_set():
        return "stalled"
    with ctx.sessions() as session:
        row = session.get(FinetuneJob, job.id)
        status = row.status if row is not None else None
    if row is None or status == "canceled":
        ctx.files.drop_checkpoint(job.tenant_id, job.id)
        if status == "canceled":
            ctx.notify(job.id)
        # With the row gone this deletes whatever the job's folders still hold.
        finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)
        return "stopped"
    if lease is not None and SHUTDOWN.is_set() and not lease.lost.is_set():
        ctx.release(FinetuneJob, job.id, lease.owner, None)
        return "released"
    return "stopped"


def publish_adapter(
    ctx: Context, job: FinetuneJob, params: FinetuneParams, result: Any, owner: str, attempt: int
) -> bool:
    """Publish the trained adapter: its file under this attempt's own name (written to a
    temporary file and renamed), then, in one transaction, the `adapters` row and the job's
    `succeeded`, only while `owner` holds the lease. False (and this attempt's file removed)
    when the lease was lost; on an exception the file is removed too."""
    from tuneqdm_core.serialization import save_adapter

    trained = result.adapter
    if trained is None:  # only method=full returns no adapter, refused above
        raise RuntimeError("finetune() returned no adapter")
    adapter_id = adapter_id_for(job.id)
    key = adapter_attempt_key(job.tenant_id, adapter_id, attempt)
    path = ctx.files.output(key)
    try:
        save_adapter(trained, path, extra=adapter_extra(job))
        size = path.stat().st_size
        ctx.files.publish(key)
        with ctx.sessions() as session:
            # The row and the status change commit together, so an adapter row always comes
            # with a succeeded job.
            done = finish_owned(
                session,
                FinetuneJob,
                job.id,
                owner,
                "succeeded",
                error=None,
                progress_step=params.steps,
                loss=result.losses[-1] if result.losses else None,
                resumed_from_step=result.resumed_from,
            )
            if done:
                session.execute(delete(Adapter).where(Adapter.id == adapter_id))
                session.add(
                    Adapter(
                        id=adapter_id,
                        tenant_id=job.tenant_id,
                        finetune_job_id=job.id,
                        name=job.name,
                        method=params.method,
                        bits=trained.bits,
                        intervals=trained.config.intervals,
                        tokens=[job.token],
                        size_bytes=size,
                        base_model=job.base_model,  # the worker's (claims filter by it)
                        base_fingerprint=ctx.runtime.base.fingerprint,
                        storage_key=key,
                    )
                )
                record_final(session, FinetuneJob, job.id)
            session.commit()
    except BaseException:
        ctx.files.discard(key)
        ctx.storage.delete(key)
        raise
    if not done:
        ctx.storage.delete(key)
    return done
