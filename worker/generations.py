"""Generation rows → one `tuneqdm_core.generate` call → PNGs and image rows.

Batching (docs/design.md): the task that starts first also claims other queued generations that can
share its denoising loop (same steps, size and scheduler), up to TUNEQDM_GENERATION_BATCH_SIZE,
whatever their adapters; each adapter goes into a slot of the worker's one ScaleBank. The
claimed jobs' own messages later claim other queued generations, or find nothing and end.
"""

from __future__ import annotations

import io
import logging
import time
from contextlib import ExitStack
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import Adapter, GeneratedImage, GenerationJob, Phase
from app.outbox import record_final
from worker import metrics
from worker.bounds import Deadline, stop_check
from worker.context import Context, end, unclaimed
from worker.failures import transient_reason, user_message
from worker.files import generated_image_attempt_key
from worker.jobs import Lease, attempts_exhausted, claim, finish_owned, new_owner

log = logging.getLogger(__name__)


def _claim_batch(
    session: Session, first: GenerationJob, attempt: int, owner: str, ctx: Context
) -> list[tuple[str, int]]:
    """`first` (already claimed) plus queued jobs that can share its loop, claimed one by one
    (a job another worker claims first is simply not part of this batch), as (id, attempt).

    A job on its second attempt or later may be the one that killed its worker: it runs
    alone, and only first attempts join a batch, so a poison job never drags other tenants'
    generations along more than once."""
    if ctx.settings.generation_batch_size <= 1 or attempt > 1:
        return [(first.id, attempt)]
    candidates = session.scalars(
        select(GenerationJob.id)
        .where(
            GenerationJob.status == "queued",
            GenerationJob.attempts == 0,
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
    batch = [(first.id, attempt)]
    for job_id in candidates:
        won = claim(session, GenerationJob, job_id, owner, stale_after_s=stale)
        if won is not None:
            batch.append((job_id, won))
            if ctx.pending_webhook(job_id):
                ctx.notify(job_id)  # its `running` webhook (worker/jobs.py claim)
    return batch


def run_generation(generation_id: str, ctx: Context) -> str:
    """Run the fairest queued generation (`generation_id` is the message's) and whatever
    joins its batch; returns what happened."""
    while True:
        with ctx.sessions() as session:
            owner = new_owner()
            claimed = ctx.claim_next(session, GenerationJob, owner, hint=generation_id)
            if claimed is None:
                return unclaimed(session, GenerationJob, generation_id)
            first = session.get(GenerationJob, claimed[0])
            assert first is not None
            session.refresh(first)
            exhausted = attempts_exhausted(claimed[1], ctx.settings.max_attempts, first.error)
            if exhausted is not None:
                # This token is not spent yet: fail the job and look for the next one.
                _fail(ctx, first.id, owner, exhausted)
                continue
            batch = _claim_batch(session, first, claimed[1], owner, ctx)
            log.info(
                "generations %s claimed (base %s)",
                ", ".join(job_id for job_id, _ in batch),
                ctx.settings.base_model,
            )
            jobs = []
            for job_id, _ in batch:
                job = session.get(GenerationJob, job_id)
                assert job is not None
                session.refresh(job)
                jobs.append(job)
            adapters = {
                a.id: (a.tenant_id, a.storage_key)
                for a in session.scalars(
                    select(Adapter).where(
                        Adapter.id.in_({j.adapter_id for j in jobs if j.adapter_id})
                    )
                )
            }
        attempts = dict(batch)
        with ExitStack() as stack:
            leases = {
                job_id: stack.enter_context(ctx.lease(GenerationJob, job_id, owner))
                for job_id in attempts
            }
            return _generate(ctx, jobs, adapters, owner, leases, attempts)


def _fail(ctx: Context, job_id: str, owner: str, message: str) -> None:
    if end(ctx, GenerationJob, job_id, owner, "failed", error=message):
        log.warning("generation %s failed: %s", job_id, message)


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


def _touch(leases: dict[str, Lease]) -> None:
    """Each denoising step is progress: a long loop keeps its leases (the watchdog gives up
    only a loop that stopped moving)."""
    for lease in leases.values():
        lease.touch()


def _enter_phase(leases: dict[str, Lease], phase: Phase) -> None:
    for lease in leases.values():
        lease.enter_phase(phase)


def _generate(
    ctx: Context,
    jobs: list[GenerationJob],
    adapters: dict[str, tuple[str, str]],
    owner: str,
    leases: dict[str, Lease],
    attempts: dict[str, int],
) -> str:
    from tuneqdm_core.cancel import Canceled
    from tuneqdm_core.generate import GenerationRequest, generate

    if not ctx.runtime.loaded:
        _enter_phase(leases, "loading base")
    runnable: list[tuple[GenerationJob, list[Any]]] = []
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
                adapter = ctx.files.adapter(ctx.runtime, job.adapter_id, found[1])
            # One request per side: the adapter's, then (compare_base) the plain base's with
            # the same seeds, in the same loop.
            sides = [adapter, None] if job.compare_base and adapter is not None else [adapter]
            runnable.append(
                (
                    job,
                    [
                        GenerationRequest(
                            prompt=job.prompt,
                            adapter=side,
                            negative_prompt=job.negative_prompt or "",
                            num_images=job.num_images,
                            steps=job.steps,
                            guidance_scale=job.guidance_scale,
                            seed=job.seed,
                            width=job.width,
                            height=job.height,
                            scheduler=job.scheduler,
                        )
                        for side in sides
                    ],
                )
            )
        except Exception as exc:
            log.exception("generation %s could not be prepared", job.id)
            _fail(
                ctx,
                job.id,
                owner,
                user_message(exc, storage_root=ctx.files.root, what="generation"),
            )
    if not runnable:
        return "failed"

    requests = [request for _, sides in runnable for request in sides]
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
        sampling = time.perf_counter()
        _enter_phase(leases, "generating")
        results = iter(
            generate(
                ctx.runtime.base,
                requests,
                bank=bank,
                precision=ctx.settings.generation_dtype,
                should_cancel=lambda: all(stop() for stop in stops.values()),
                on_step=lambda done, total: _touch(leases),
            )
        )
        metrics.generation_batch(ctx.settings.base_model, time.perf_counter() - sampling)
    except Canceled:
        for job, _ in runnable:
            _stopped(ctx, job.id, owner, leases[job.id], deadlines[job.id])
        log.info("generation batch %s stopped", [j.id for j, _ in runnable])
        return "stopped"
    except Exception as exc:
        log.exception("generation batch %s raised", [j.id for j, _ in runnable])
        message = user_message(exc, storage_root=ctx.files.root, what="generation")
        for job, _ in runnable:
            _fail(ctx, job.id, owner, message)
        return "failed"

    for job, sides in runnable:
        # The adapter's images, then (compare_base) the base's: side 0, then side 1.
        made = [next(results) for _ in sides]
        images = [
            (image, side > 0) for side, side_images in enumerate(made) for image in side_images
        ]
        # Finished images of a generation past its time limit are still delivered; a canceled
        # or taken-over one publishes nothing.
        if leases[job.id].should_stop() or not leases[job.id].enter_phase("saving"):
            _stopped(ctx, job.id, owner, leases[job.id], deadlines[job.id])
            continue
        try:
            publish_images(ctx, job, images, owner, attempts[job.id])
        except Exception as exc:
            reason = transient_reason(exc)
            if reason is None:
                raise
            log.warning("generation %s hit a transient fault", job.id, exc_info=True)
            ctx.release(GenerationJob, job.id, owner, reason)
    log.info("generated %d job(s) in one loop", len(runnable))
    return f"succeeded (batch of {len(runnable)})"


def publish_images(
    ctx: Context, job: GenerationJob, images: list[tuple[Any, bool]], owner: str, attempt: int
) -> bool:
    """Write the PNGs under this attempt's own folder (each by temporary file and rename),
    then the image rows and `succeeded` in one transaction while `owner` holds the lease;
    this attempt's files are removed when the lease was lost or anything failed. `images`
    pairs each core image with whether it is the plain base's (compare_base)."""
    keys = []
    try:
        for index, (generated, base) in enumerate(images):
            buffer = io.BytesIO()
            generated.image.save(buffer, format="PNG")
            key = generated_image_attempt_key(job.tenant_id, job.id, attempt, index)
            keys.append((index, generated.seed, base, key, buffer.getbuffer().nbytes))
            ctx.storage.put(key, buffer.getvalue())
        with ctx.sessions() as session:
            done = finish_owned(session, GenerationJob, job.id, owner, "succeeded", error=None)
            if done:
                session.add_all(
                    GeneratedImage(
                        generation_id=job.id,
                        index=i,
                        seed=seed,
                        base=base,
                        storage_key=key,
                        size_bytes=size,
                    )
                    for i, seed, base, key, size in keys
                )
                record_final(session, GenerationJob, job.id)
            session.commit()
    except BaseException:
        for *_, key, _ in keys:
            ctx.storage.delete(key)
        raise
    if not done:
        # Canceled, deleted or taken over meanwhile: only this attempt's own images go.
        for *_, key, _ in keys:
            ctx.storage.delete(key)
    else:
        ctx.notify(job.id)
    return done
