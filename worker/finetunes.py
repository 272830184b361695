"""A fine-tune job row → `tuneqdm_core.finetune` → an adapter file and row.

`run_finetune` is what the Celery task calls; it takes everything it uses as arguments, so
tests run it in-process without a broker.
"""

from __future__ import annotations

import logging
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.models import Adapter, FinetuneJob
from app.outbox import record_final
from app.schemas import FinetuneParams
from app.services.retention import finetune_ended
from app.settings import Settings
from worker import metrics
from worker.bounds import Deadline, stop_check
from worker.failures import user_message
from worker.jobs import Lease, ProgressWriter, claim, finish_owned, new_owner
from worker.runtime import Runtime

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "canceled")
BASE_FAILED = (
    "the service could not load its base model; the operator has been told (worker log), "
    "submit the job again later"
)


@dataclass
class Context:
    """What a task needs from its process: settings, database, storage, the model runtime and
    `notify`, a callable taking a job id that asks for its webhook's first attempt now (the
    delivery row itself is written with the job's final state; the sweep is the safety net)."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: st.LocalStorage
    runtime: Runtime
    notify: Callable[[str], None]


def checkpoint_key(tenant_id: str, job_id: str) -> str:
    return st.check_key(f"tenants/{tenant_id}/finetunes/{job_id}/checkpoint")


def adapter_id_for(job_id: str) -> str:
    # One adapter per job, the same id on every attempt: a retried save overwrites its own file.
    return "ad_" + job_id.removeprefix("ft_")


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


def _refusal(params: FinetuneParams, settings: Settings) -> str | None:
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


def _fail(ctx: Context, job: FinetuneJob, owner: str, message: str) -> None:
    with ctx.sessions() as session:
        done = finish_owned(session, FinetuneJob, job.id, owner, "failed", error=message)
        if done:
            record_final(session, FinetuneJob, job.id)
        session.commit()
    if done:
        log.warning("fine-tune %s failed: %s", job.id, message)
        ctx.notify(job.id)
        finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)


def run_finetune(job_id: str, ctx: Context) -> str:
    """Run one fine-tune job; returns what happened (for logs and tests)."""
    with ctx.sessions() as session:
        job = session.get(FinetuneJob, job_id)
        if job is None:
            return "missing"  # the API removed it after a failed publish
        if job.status in TERMINAL:
            if job.status == "canceled" and job.started_at is None:
                ctx.notify(job.id)  # canceled while queued: the API wrote its webhook row
                finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)
            return f"skipped ({job.status})"
        owner = new_owner()
        if not claim(session, FinetuneJob, job_id, owner, stale_after_s=ctx.settings.stale_after_s):
            return "skipped (held by another worker)"
        session.refresh(job)
        image_keys = [img.storage_key for img in job.images]
    params = FinetuneParams.model_validate(job.params)
    refusal = _refusal(params, ctx.settings)
    if refusal is not None:
        _fail(ctx, job, owner, refusal)
        return "failed"

    with Lease(
        ctx.sessions, FinetuneJob, job_id, owner, heartbeat_s=ctx.settings.heartbeat_s
    ) as lease:
        try:
            _ = ctx.runtime.base
        except Exception:
            # Misconfiguration (wrong TUNEQDM_MODEL, no GPU): not the user's fault to fix.
            log.exception("the base model could not be loaded")
            _fail(ctx, job, owner, BASE_FAILED)
            return "failed"
        try:
            outcome = _train(ctx, job, params, image_keys, lease)
        except Exception as exc:
            log.exception("fine-tune %s raised", job_id)
            _fail(
                ctx, job, owner, user_message(exc, storage_root=ctx.storage.root, what="fine-tune")
            )
            return "failed"
    return outcome


def _train(
    ctx: Context, job: FinetuneJob, params: FinetuneParams, image_keys: list[str], lease: Lease
) -> str:
    from tuneqdm_core.finetune import FinetuneCanceled, Subject, finetune
    from tuneqdm_core.serialization import save_adapter

    base = ctx.runtime.base
    checkpoint_dir = ctx.storage.path(checkpoint_key(job.tenant_id, job.id))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    subject = Subject(
        instance_prompt=job.instance_prompt,
        images=[ctx.storage.path(key) for key in image_keys],
        class_prompt=job.class_prompt,
    )
    config = finetune_config(params, job.id)
    write = ProgressWriter(lease, every_s=min(1.0, ctx.settings.heartbeat_s), clock=time.monotonic)
    deadline = Deadline(job.started_at, job.time_limit_s, "TUNEQDM_FINETUNE_TIME_LIMIT_S")
    first = True
    last = time.perf_counter()

    def progress(p: Any) -> None:
        nonlocal first, last
        now = time.perf_counter()
        if not first:  # the first call's interval includes encoding the photos
            metrics.FINETUNE_STEP_SECONDS.observe(now - last)
        last = now
        if first:
            # The first step of this run tells where it started: 0, or a checkpoint's step.
            first = False
            write(p.step, p.total, p.loss, resumed_from_step=p.step - 1)
        else:
            write(p.step, p.total, p.loss)

    try:
        result = finetune(
            base,
            [subject],
            config,
            checkpoint_dir=checkpoint_dir,
            cache_dir=ctx.settings.resolved_quant_cache_dir / "class-images",
            progress=progress,
            should_cancel=stop_check(lease.should_stop, deadline),
            on_class_images=lambda done, total: log.info(
                "fine-tune %s: class images %d/%d", job.id, done, total
            ),
        )
    except FinetuneCanceled as stop:
        if deadline.passed() and not lease.should_stop():
            log.warning("fine-tune %s passed its time limit at step %d", job.id, stop.step)
            _fail(ctx, job, lease.owner, deadline.message("fine-tune", "fewer steps"))
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            return "failed"
        log.info("fine-tune %s stopped at step %d (canceled or taken over)", job.id, stop.step)
        _after_stop(ctx, job)
        return "stopped"

    trained = result.adapter
    if trained is None:  # only method=full returns no adapter, refused above
        raise RuntimeError("finetune() returned no adapter")
    adapter_id = adapter_id_for(job.id)
    key = st.adapter_key(job.tenant_id, adapter_id)
    path = ctx.storage.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_adapter(
        trained,
        path,
        extra={"tokens": [job.token], "instance_prompt": job.instance_prompt, "job": job.id},
    )
    with ctx.sessions() as session:
        # Only the lease holder may finish the job; the row and the status change commit
        # together, so an adapter row always comes with a succeeded job.
        done = finish_owned(
            session,
            FinetuneJob,
            job.id,
            lease.owner,
            "succeeded",
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
                    size_bytes=path.stat().st_size,
                    base_model=ctx.settings.base_model,
                    base_fingerprint=base.fingerprint,
                    storage_key=key,
                )
            )
            record_final(session, FinetuneJob, job.id)
        session.commit()
    if not done:
        ctx.storage.delete(key)
        _after_stop(ctx, job)
        return "stopped"
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    log.info(
        "fine-tune %s succeeded in %.1f s (resumed from step %d)",
        job.id,
        result.seconds,
        result.resumed_from,
    )
    ctx.notify(job.id)
    finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)
    return "succeeded"


def _after_stop(ctx: Context, job: FinetuneJob) -> None:
    """A canceled job drops its checkpoint and tells its webhook; a taken-over one does nothing
    (its new worker continues from the checkpoint)."""
    with ctx.sessions() as session:
        status = session.get(FinetuneJob, job.id)
        if status is not None and status.status == "canceled":
            shutil.rmtree(ctx.storage.path(checkpoint_key(job.tenant_id, job.id)), True)
            ctx.notify(job.id)
    finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)
