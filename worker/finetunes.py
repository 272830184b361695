"""A fine-tune job row → `tuneqdm_core.finetune` → an adapter file and row.

`run_finetune` is what the Celery task calls; it takes everything it uses as arguments, so
tests run it in-process without a broker. Its message is a token (worker/jobs.py): it runs the
fairest queued fine-tune, which is the message's own job unless others wait.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from app import storage as st
from app.events import record_event
from app.families import generation_rules
from app.models import FinetuneCheckpoint, FinetuneJob, FinetuneSample
from app.outbox import record_webhook
from app.schemas import FinetuneParams
from app.services.retention import finetune_ended
from worker import metrics
from worker.bases import loaded_info
from worker.bounds import Deadline, stop_check
from worker.context import Context, unclaimed, while_owned
from worker.cotrain import run_group
from worker.files import checkpoint_attempt_key
from worker.jobs import SHUTDOWN, Lease, ProgressWriter, attempts_exhausted, new_owner
from worker.training import (
    BASE_FAILED,
    adapter_extra,
    after_stop,
    fail,
    finetune_config,
    publish_adapter,
    raised,
    refusal,
    save_checkpoint,
    succeeded,
)

log = logging.getLogger(__name__)

# Progress image i of every sampling point uses seed SAMPLE_SEED + i (docs/api.md).
SAMPLE_SEED = 0


def run_finetune(job_id: str, ctx: Context) -> str:
    """Run the fairest queued fine-tune (`job_id` is the message's); returns what happened
    (for logs and tests)."""
    with ctx.sessions() as session:
        job = session.get(FinetuneJob, job_id)
        if job is not None and job.status == "canceled" and job.started_at is None:
            ctx.notify(job.id)  # canceled while queued: the API wrote its webhook row
            finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)
    while True:
        with ctx.sessions() as session:
            owner = new_owner()
            claimed = ctx.claim_next(session, FinetuneJob, owner, hint=job_id)
            if claimed is None:
                return unclaimed(session, FinetuneJob, job_id)
            claimed_id, attempt = claimed
            log.info(
                "fine-tune %s claimed (attempt %d, base %s)",
                claimed_id,
                attempt,
                ctx.settings.base_model,
            )
            run = session.get(FinetuneJob, claimed_id)
            assert run is not None
            session.refresh(run)
            image_keys = [img.storage_key for img in run.images]
        exhausted = attempts_exhausted(attempt, ctx.settings.max_attempts, run.error)
        if exhausted is None:
            try:
                return _run_claimed(ctx, run, owner, attempt, image_keys)
            finally:
                # Local copies of its photos and checkpoint (none with the local backend).
                ctx.files.discard(st.finetune_prefix(run.tenant_id, run.id))
        # This token is not spent yet: fail the job and look for the next one.
        fail(ctx, run, owner, exhausted)


def _run_claimed(
    ctx: Context, job: FinetuneJob, owner: str, attempt: int, image_keys: list[str]
) -> str:
    params = FinetuneParams.model_validate(job.params)
    refused = refusal(params, ctx.settings)
    if refused is not None:
        fail(ctx, job, owner, refused)
        return "failed"
    if ctx.settings.cotrain_max > 1 and attempt == 1 and not params.validation_prompts:
        # A first attempt trains with whatever compatible jobs wait (worker/cotrain.py); a
        # retry trains alone, so a job that kills its worker harms others at most once; so
        # does a job with progress images (the group loop makes none).
        return run_group(ctx, job, owner, attempt, image_keys)

    with ctx.lease(FinetuneJob, job.id, owner) as lease:
        lease.write(group_size=None)  # alone now, whatever an earlier attempt trained with
        try:
            if not ctx.runtime.loaded:
                lease.enter_phase("loading base")
            _ = ctx.runtime.base
        except Exception:
            # Misconfiguration (wrong TUNEQDM_MODEL, no GPU): not the user's fault to fix.
            log.exception("the base model could not be loaded")
            fail(ctx, job, owner, BASE_FAILED)
            return "failed"
        try:
            result = _train(ctx, job, params, image_keys, lease, attempt)
            if isinstance(result, str):
                return result  # ended by its time limit
            if result is None or not lease.enter_phase("saving"):
                return after_stop(ctx, job, lease)
            if not publish_adapter(ctx, job, params, result, owner, attempt):
                return after_stop(ctx, job, lease)
        except Exception as exc:
            return raised(ctx, job, owner, exc)
    return succeeded(ctx, job, result)


def _train(
    ctx: Context,
    job: FinetuneJob,
    params: FinetuneParams,
    image_keys: list[str],
    lease: Lease,
    attempt: int,
) -> Any:
    """Train (resuming from the job's checkpoint); the core's FinetuneResult, or None when the
    run stopped early (canceled, lease lost, worker stopping or stalled)."""
    from tuneqdm_core.finetune import FinetuneCanceled, Subject, finetune

    deadline = Deadline(job.started_at, job.time_limit_s, "TUNEQDM_FINETUNE_TIME_LIMIT_S")
    sampling = sampling_for(ctx, params)
    if sampling is not None:
        base_samples(ctx, job, params, lease, sampling, stop_check(lease.should_stop, deadline))
    lease.enter_phase("preparing photos")
    checkpoint_dir = ctx.files.checkpoint_dir(job.tenant_id, job.id)
    subject = Subject(
        instance_prompt=job.instance_prompt,
        images=[ctx.files.fetch(key) for key in image_keys],
        class_prompt=job.class_prompt,
    )
    config = finetune_config(params, job.id)
    write = ProgressWriter(lease, every_s=min(1.0, ctx.settings.heartbeat_s), clock=time.monotonic)
    first = True
    last = time.perf_counter()

    def class_images(done: int, total: int) -> None:
        lease.touch()  # each chunk of class images is progress too
        lease.enter_phase("making class images")
        log.info("fine-tune %s: class images %d/%d", job.id, done, total)

    def progress(p: Any) -> None:
        nonlocal first, last
        # The previous step's save, if any; nothing once the lease is lost.
        if not save_checkpoint(ctx, job, lease) or not lease.enter_phase("training"):
            return
        now = time.perf_counter()
        if first:  # the first call's interval includes encoding the photos
            metrics.first_step(ctx.settings.base_model, now - last)
        else:
            metrics.finetune_step(ctx.settings.base_model, now - last)
        last = now
        if first:
            # The first step of this run tells where it started: 0, or a checkpoint's step.
            first = False
            write(p.step, p.total, p.loss, resumed_from_step=p.step - 1)
        else:
            write(p.step, p.total, p.loss)

    def sample_step(done: int, total: int) -> None:
        lease.touch()  # each denoising step of the progress images is progress too
        lease.enter_phase("progress images")

    def samples(step: int, images: list[Any], adapter: Any) -> None:
        lease.touch()
        if not store_samples(ctx, job, params, lease, step, images):
            log.info("fine-tune %s lost its lease while storing samples", job.id)
        elif params.keep_checkpoints and not store_checkpoint(
            ctx, job, lease, attempt, step, adapter
        ):
            log.info("fine-tune %s lost its lease while storing a checkpoint", job.id)

    try:
        result = finetune(
            ctx.runtime.base,
            [subject],
            config,
            checkpoint_dir=checkpoint_dir,
            cache_dir=ctx.settings.resolved_quant_cache_dir / "class-images",
            progress=progress,
            should_cancel=stop_check(lease.should_stop, deadline),
            on_class_images=class_images,
            # A worker asked to stop saves the step it is at, so the next one loses nothing.
            should_pause=SHUTDOWN.is_set,
            sampling=sampling,
            on_sample=samples,
            on_sample_step=sample_step,
        )
    except FinetuneCanceled as stop:
        if deadline.passed() and not lease.should_stop():
            log.warning("fine-tune %s passed its time limit at step %d", job.id, stop.step)
            fail(ctx, job, lease.owner, deadline.message("fine-tune", "fewer steps"))
            ctx.files.drop_checkpoint(job.tenant_id, job.id)
            return "failed"
        log.info("fine-tune %s stopped at step %d", job.id, stop.step)
        if not lease.should_stop():
            # A pausing worker saved the step it stopped at: the next worker resumes from it.
            # (One that lost its lease uploads nothing over its successor's checkpoint.)
            save_checkpoint(ctx, job, lease)
        return None
    return result


def sampling_for(ctx: Context, params: FinetuneParams) -> Any:
    """The core's Sampling for the job's validation prompts (None without any): the base's
    native size and family guidance, TUNEQDM_SAMPLE_STEPS, prompt i with seed SAMPLE_SEED + i
    at every step."""
    if not params.validation_prompts or params.sample_every is None:
        return None
    from tuneqdm_core.finetune import Sampling

    info = loaded_info(ctx.settings, ctx.runtime.base)
    return Sampling(
        prompts=list(params.validation_prompts),
        every=params.sample_every,
        size=info.native_resolution,
        steps=ctx.settings.sample_steps,
        seed=SAMPLE_SEED,
        # The family's default guidance, as a generation without guidance_scale gets it.
        guidance_scale=generation_rules(info.family, info.guidance).guidance_scale,
        precision=ctx.settings.generation_dtype,
    )


def base_samples(
    ctx: Context,
    job: FinetuneJob,
    params: FinetuneParams,
    lease: Lease,
    sampling: Any,
    should_cancel: Callable[[], bool],
) -> None:
    """The progress images of step 0: the plain base with the prompts and seeds of every later
    sampling point, so the first column shows what the training starts from. Made once (a
    resumed job that has them skips this); one small batch of TUNEQDM_SAMPLE_STEPS steps.
    Stopped (canceled, lease lost, time limit) it stores nothing; the training that follows
    then stops at once."""
    from tuneqdm_core.cancel import Canceled
    from tuneqdm_core.generate import GenerationRequest, generate

    with ctx.sessions() as session:
        have = session.scalar(
            select(FinetuneSample.id).where(FinetuneSample.job_id == job.id).limit(1)
        )
    if have is not None or not lease.enter_phase("progress images"):
        return
    requests = [
        GenerationRequest(
            prompt=prompt,
            steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            seed=sampling.seed + i,
            width=sampling.size,
            height=sampling.size,
        )
        for i, prompt in enumerate(sampling.prompts)
    ]
    try:
        made = generate(
            ctx.runtime.base,
            requests,
            precision=sampling.precision,
            on_step=lambda done, total: lease.touch(),
            should_cancel=should_cancel,
        )
    except Canceled:
        return
    store_samples(ctx, job, params, lease, 0, [images[0].image for images in made])


def store_samples(
    ctx: Context,
    job: FinetuneJob,
    params: FinetuneParams,
    lease: Lease,
    step: int,
    images: list[Any],
) -> bool:
    """Write the PNGs of one sampling point, their rows and a `samples` event, all while the
    job's row is locked under a lease that still holds (worker/context.py `while_owned`): a
    canceled or deleted job gets neither rows nor files. A (step, prompt) that has a row
    already (a resumed job sampling a step again) adds nothing, not even a file. False when
    the lease is lost."""
    encoded: dict[int, bytes] = {}
    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        encoded[index] = buffer.getvalue()
    written: list[str] = []
    delivery = None
    with while_owned(ctx, lease) as session:
        if session is None:
            return False
        have = set(
            session.scalars(
                select(FinetuneSample.prompt_index).where(
                    FinetuneSample.job_id == job.id, FinetuneSample.step == step
                )
            )
        )
        new = sorted(set(encoded) - have)
        try:
            for index in new:
                key = st.finetune_sample_key(job.tenant_id, job.id, step, index)
                ctx.storage.put(key, encoded[index])
                written.append(key)
                session.add(
                    FinetuneSample(
                        job_id=job.id,
                        step=step,
                        prompt_index=index,
                        prompt=params.validation_prompts[index],
                        seed=SAMPLE_SEED + index,
                        storage_key=key,
                        size_bytes=len(encoded[index]),
                    )
                )
            if new:
                # Under the row lock of the lease check: this event is in order.
                record_event(session, job.id, "samples", step=step, prompt_indexes=new)
                delivery = record_webhook(
                    session,
                    FinetuneJob,
                    job.id,
                    "samples",
                    samples=[
                        {
                            "step": step,
                            "prompt_index": i,
                            "url": f"/v1/finetunes/{job.id}/samples/{step}/{i}",
                        }
                        for i in new
                    ],
                )
        except BaseException:
            for key in written:
                ctx.storage.delete(key)
            raise
    if delivery is not None:
        ctx.notify(job.id)
    return True


def store_checkpoint(
    ctx: Context, job: FinetuneJob, lease: Lease, attempt: int, step: int, adapter: Any
) -> bool:
    """Keep the adapter as it is at `step` (params.keep_checkpoints): its file under this
    attempt's own name and its row, written while the job's row is locked under a lease that
    still holds, like `store_samples`. A step that has a row already (a resumed job reaching it
    again) adds nothing. False when the lease is lost."""
    from tuneqdm_core.serialization import save_adapter

    key = checkpoint_attempt_key(job.tenant_id, job.id, step, attempt)
    with tempfile.TemporaryDirectory(prefix="tuneqdm-checkpoint-") as folder:
        path = save_adapter(adapter, Path(folder) / "adapter.safetensors", adapter_extra(job))
        with while_owned(ctx, lease) as session:
            if session is None:
                return False
            have = session.scalar(
                select(FinetuneCheckpoint.id).where(
                    FinetuneCheckpoint.job_id == job.id, FinetuneCheckpoint.step == step
                )
            )
            if have is not None:
                return True
            ctx.storage.put_file(key, path)
            try:
                session.add(
                    FinetuneCheckpoint(
                        job_id=job.id,
                        step=step,
                        storage_key=key,
                        size_bytes=path.stat().st_size,
                    )
                )
                session.flush()
            except BaseException:
                ctx.storage.delete(key)
                raise
    return True
