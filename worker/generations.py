"""Generation rows → one `tuneqdm_core.generate` call → PNGs and image rows.

Batching (docs/design.md): the task that starts first also claims other queued generations that can
share its denoising loop (same steps, size and scheduler), up to TUNEQDM_GENERATION_BATCH_SIZE,
whatever their adapters; each adapter goes into a slot of the worker's one ScaleBank. The
claimed jobs' own messages later find them finished and skip.
"""

from __future__ import annotations

import io
import logging
from contextlib import ExitStack
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app import storage as st
from app.models import Adapter, GeneratedImage, GenerationJob
from app.outbox import record_final
from app.services.retention import discard_generation_files
from worker import metrics
from worker.bounds import Deadline, stop_check
from worker.failures import user_message
from worker.finetunes import TERMINAL, Context
from worker.jobs import Lease, claim, finish_owned, new_owner

log = logging.getLogger(__name__)


def _claim_batch(session: Session, first: GenerationJob, owner: str, ctx: Context) -> list[str]:
    """`first` (already claimed) plus queued jobs that can share its loop, claimed one by one
    (a job another worker claims first is simply not part of this batch)."""
    if ctx.settings.generation_batch_size <= 1:
        return [first.id]
    candidates = session.scalars(
        select(GenerationJob.id)
        .where(
            GenerationJob.status == "queued",
            GenerationJob.id != first.id,
            GenerationJob.base_model == first.base_model,
            GenerationJob.steps == first.steps,
            GenerationJob.width == first.width,
            GenerationJob.height == first.height,
            GenerationJob.scheduler == first.scheduler,
        )
        .order_by(GenerationJob.created_at)
        .limit(ctx.settings.generation_batch_size - 1)
    ).all()
    stale = ctx.settings.stale_after_s
    return [first.id] + [
        job_id
        for job_id in candidates
        if claim(session, GenerationJob, job_id, owner, stale_after_s=stale)
    ]


def run_generation(generation_id: str, ctx: Context) -> str:
    """Run a generation and whatever joins its batch; returns what happened."""
    with ctx.sessions() as session:
        gen = session.get(GenerationJob, generation_id)
        if gen is None:
            return "missing"
        if gen.status in TERMINAL:
            return f"skipped ({gen.status})"
        owner = new_owner()
        stale = ctx.settings.stale_after_s
        if not claim(session, GenerationJob, generation_id, owner, stale_after_s=stale):
            return "skipped (held by another worker)"
        session.refresh(gen)
        ids = _claim_batch(session, gen, owner, ctx)
        jobs = [session.get(GenerationJob, job_id) for job_id in ids]
        for job in jobs:
            assert job is not None
            session.refresh(job)
        adapters = {
            a.id: (a.tenant_id, a.storage_key)
            for a in session.scalars(
                select(Adapter).where(
                    Adapter.id.in_({j.adapter_id for j in jobs if j and j.adapter_id})
                )
            )
        }
    with ExitStack() as stack:
        leases = {
            job_id: stack.enter_context(
                Lease(
                    ctx.sessions,
                    GenerationJob,
                    job_id,
                    owner,
                    heartbeat_s=ctx.settings.heartbeat_s,
                )
            )
            for job_id in ids
        }
        return _generate(ctx, [j for j in jobs if j is not None], adapters, owner, leases)


def _fail(ctx: Context, job_id: str, owner: str, message: str) -> None:
    with ctx.sessions() as session:
        done = finish_owned(session, GenerationJob, job_id, owner, "failed", error=message)
        if done:
            record_final(session, GenerationJob, job_id)
        session.commit()
    log.warning("generation %s failed: %s", job_id, message)
    if done:
        ctx.notify(job_id)


def _stopped(ctx: Context, job_id: str, owner: str, lease: Lease, deadline: Deadline) -> None:
    """A generation that must not publish: failed when it passed its time limit; a canceled or
    taken-over one is already in the state its canceler or new owner gave it."""
    if deadline.passed() and not lease.should_stop():
        _fail(
            ctx,
            job_id,
            owner,
            deadline.message("generation", "fewer steps or images, or a smaller size"),
        )
    else:
        log.info("generation %s stopped (canceled or taken over); its images are dropped", job_id)


def _generate(
    ctx: Context,
    jobs: list[GenerationJob],
    adapters: dict[str, tuple[str, str]],
    owner: str,
    leases: dict[str, Lease],
) -> str:
    from tuneqdm_core.cancel import Canceled
    from tuneqdm_core.generate import GenerationRequest, generate

    runnable: list[tuple[GenerationJob, Any]] = []
    for job in jobs:
        try:
            if job.base_model != ctx.settings.base_model:
                _fail(
                    ctx,
                    job.id,
                    owner,
                    f"this service now runs base model {ctx.settings.base_model!r}, the "
                    f"generation asked for {job.base_model!r}; submit it again",
                )
                continue
            adapter = None
            if job.adapter_id is not None:
                found = adapters.get(job.adapter_id)
                if found is None or found[0] != job.tenant_id:
                    _fail(
                        ctx,
                        job.id,
                        owner,
                        f"adapter {job.adapter_id} was deleted before the generation ran",
                    )
                    continue
                adapter = ctx.runtime.adapter(job.adapter_id, ctx.storage.path(found[1]))
            request = GenerationRequest(
                prompt=job.prompt,
                adapter=adapter,
                negative_prompt=job.negative_prompt or "",
                num_images=job.num_images,
                steps=job.steps,
                guidance_scale=job.guidance_scale,
                seed=job.seed,
                width=job.width,
                height=job.height,
                scheduler=job.scheduler,
            )
            runnable.append((job, request))
        except Exception as exc:
            log.exception("generation %s could not be prepared", job.id)
            _fail(
                ctx,
                job.id,
                owner,
                user_message(exc, storage_root=ctx.storage.root, what="generation"),
            )
    if not runnable:
        return "failed"

    requests = [request for _, request in runnable]
    distinct = {id(r.adapter): r.adapter for r in requests if r.adapter is not None}
    intervals = max([a.config.intervals for a in distinct.values()] + [1])
    deadlines = {
        job.id: Deadline(job.started_at, job.time_limit_s, "TUNEQDM_GENERATION_TIME_LIMIT_S")
        for job, _ in runnable
    }
    stops = {job_id: stop_check(leases[job_id].should_stop, d) for job_id, d in deadlines.items()}
    try:
        bank = ctx.runtime.bank(len(distinct), intervals)
        # The loop is shared: it stops (within one UNet call) only when every generation in it
        # was canceled, taken over or passed its time limit. One canceled generation among
        # other tenants' ones only loses its own images below.
        with metrics.GENERATION_SECONDS.time():
            results = generate(
                ctx.runtime.base,
                requests,
                bank=bank,
                precision=ctx.settings.generation_dtype,
                should_cancel=lambda: all(stop() for stop in stops.values()),
            )
    except Canceled:
        for job, _ in runnable:
            _stopped(ctx, job.id, owner, leases[job.id], deadlines[job.id])
        log.info("generation batch %s stopped", [j.id for j, _ in runnable])
        return "stopped"
    except Exception as exc:
        log.exception("generation batch %s raised", [j.id for j, _ in runnable])
        message = user_message(exc, storage_root=ctx.storage.root, what="generation")
        for job, _ in runnable:
            _fail(ctx, job.id, owner, message)
        return "failed"

    for (job, _), images in zip(runnable, results, strict=True):
        # Finished images of a generation past its time limit are still delivered; a canceled
        # or taken-over one publishes nothing.
        if leases[job.id].should_stop():
            _stopped(ctx, job.id, owner, leases[job.id], deadlines[job.id])
            continue
        keys = []
        for index, generated in enumerate(images):
            buffer = io.BytesIO()
            generated.image.save(buffer, format="PNG")
            key = st.generated_image_key(job.tenant_id, job.id, index)
            ctx.storage.put(key, buffer.getvalue())
            keys.append((index, generated.seed, key))
        with ctx.sessions() as session:
            # A retried job replaces its image rows instead of adding a second set.
            session.execute(delete(GeneratedImage).where(GeneratedImage.generation_id == job.id))
            if finish_owned(session, GenerationJob, job.id, owner, "succeeded"):
                session.add_all(
                    GeneratedImage(
                        generation_id=job.id,
                        index=i,
                        seed=seed,
                        storage_key=key,
                        size_bytes=ctx.storage.path(key).stat().st_size,
                    )
                    for i, seed, key in keys
                )
                record_final(session, GenerationJob, job.id)
                session.commit()
                ctx.notify(job.id)
            else:
                # Canceled (or taken over) after the check above: its images are nobody's.
                session.rollback()
                discard_generation_files(ctx.storage, job.tenant_id, job.id)
    log.info("generated %d job(s) in one loop", len(runnable))
    return f"succeeded (batch of {len(runnable)})"
