"""A fine-tune job row → `tuneqdm_core.finetune` → an adapter file and row.

`run_finetune` is what the Celery task calls; it takes everything it uses as arguments, so
tests run it in-process without a broker. Its message is a token (worker/jobs.py): it runs the
fairest queued fine-tune, which is the message's own job unless others wait.
"""

from __future__ import annotations

import io
import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.events import record_event
from app.models import Adapter, FinetuneJob, FinetuneSample, GenerationJob
from app.outbox import record_final
from app.schemas import FinetuneParams
from app.services.retention import finetune_ended
from app.settings import Settings
from worker import metrics
from worker.bases import loaded_info
from worker.bounds import Deadline, stop_check
from worker.failures import transient_reason, user_message
from worker.files import adapter_attempt_key, checkpoint_key  # noqa: F401 (tests import it here)
from worker.jobs import (
    SHUTDOWN,
    JobModel,
    Lease,
    ProgressWriter,
    attempts_exhausted,
    claim_next,
    finish_owned,
    new_owner,
    release_owned,
    write_owned,
)
from worker.runtime import Runtime
from worker.staging import Staging

log = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "canceled")
# Progress image i of every sampling point uses seed SAMPLE_SEED + i (docs/api.md).
SAMPLE_SEED = 0
BASE_FAILED = (
    "the service could not load its base model; the operator has been told (worker log), "
    "submit the job again later"
)


# The storage backend's own type: tests that run on the local backend reach its paths.
S = TypeVar("S", bound=st.Storage)


@dataclass
class Context(Generic[S]):
    """What a task needs from its process: settings, database, storage (and `files`, the local
    copies of stored files the model code reads and writes: worker/staging.py), the model runtime,
    `notify`, a callable taking a job id that asks for its webhook's first attempt now (the
    delivery row itself is written with the job's final state; the sweep is the safety net),
    what sends a message for a job given back to the queue (`requeue`; without it the sweep's
    reconciler sends one later), and what a stalled job's watchdog does to its process
    (`on_stall`: restart it)."""

    settings: Settings
    sessions: sessionmaker[Session]
    storage: S
    runtime: Runtime
    notify: Callable[[str], None]
    requeue: Callable[[JobModel, str], None] | None = None
    on_stall: Callable[[JobModel, str], None] | None = None
    files: Staging = field(init=False)

    def __post_init__(self) -> None:
        self.files = Staging(self.storage, self.settings.resolved_staging_dir)

    def claim_next(
        self, session: Session, model: JobModel, owner: str, hint: str
    ) -> tuple[str, int] | None:
        """`jobs.claim_next` for this worker: its base only, its stale time."""
        return claim_next(
            session,
            model,
            owner,
            stale_after_s=self.settings.stale_after_s,
            hint=hint,
            base=self.settings.base_model,
        )

    def lease(self, model: JobModel, job_id: str, owner: str) -> Lease:
        """The lease of a job this process claimed, with its heartbeat, stall timeout and
        watchdog (entering it starts the heartbeat)."""
        return Lease(
            self.sessions,
            model,
            job_id,
            owner,
            heartbeat_s=self.settings.heartbeat_s,
            progress_timeout_s=self.settings.progress_timeout_s,
            on_stall=self.on_stall,
        )

    def release(self, model: JobModel, job_id: str, owner: str, reason: str | None) -> None:
        """Give the job back for another attempt (one that does not count when `reason` is
        None: the worker is stopping) and send its message at once."""
        try:
            released = release_owned(
                self.sessions, model, job_id, owner, reason=reason, counts=reason is not None
            )
        except Exception:
            # The database is gone too: the lease runs out and the sweep requeues the job.
            log.exception("could not release %s", job_id)
            return
        if released and self.requeue is not None:
            try:
                self.requeue(model, job_id)
            except Exception:
                log.exception("could not send %s again; the reconciler will", job_id)


def unclaimed(session: Session, model: JobModel, job_id: str) -> str:
    """What a task whose message named `job_id` did when it claimed nothing."""
    job = cast("FinetuneJob | GenerationJob | None", session.get(model, job_id))
    if job is None:
        return "missing"  # e.g. the API removed a fine-tune after a failed publish
    if job.status in TERMINAL:
        return f"skipped ({job.status})"
    return "skipped (held by another worker)"


def adapter_id_for(job_id: str) -> str:
    # One adapter per job, the same id on every attempt (each attempt's file has its own name).
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
        _fail(ctx, run, owner, exhausted)


def _run_claimed(
    ctx: Context, job: FinetuneJob, owner: str, attempt: int, image_keys: list[str]
) -> str:
    params = FinetuneParams.model_validate(job.params)
    refusal = _refusal(params, ctx.settings)
    if refusal is not None:
        _fail(ctx, job, owner, refusal)
        return "failed"
    if ctx.settings.cotrain_max > 1 and attempt == 1 and not params.validation_prompts:
        # A first attempt trains with whatever compatible jobs wait (worker/cotrain.py); a
        # retry trains alone, so a job that kills its worker harms others at most once; so
        # does a job with progress images (the group loop makes none).
        from worker.cotrain import run_group  # it builds on this module

        return run_group(ctx, job, owner, attempt, image_keys)

    with ctx.lease(FinetuneJob, job.id, owner) as lease:
        lease.write(group_size=None)  # alone now, whatever an earlier attempt trained with
        try:
            _ = ctx.runtime.base
        except Exception:
            # Misconfiguration (wrong TUNEQDM_MODEL, no GPU): not the user's fault to fix.
            log.exception("the base model could not be loaded")
            _fail(ctx, job, owner, BASE_FAILED)
            return "failed"
        try:
            result = _train(ctx, job, params, image_keys, lease)
            if isinstance(result, str):
                return result  # ended by its time limit
            if result is None:
                return _after_stop(ctx, job, lease)
            if not publish_adapter(ctx, job, params, result, owner, attempt):
                return _after_stop(ctx, job, lease)
        except Exception as exc:
            return _raised(ctx, job, owner, exc)
    return _succeeded(ctx, job, result)


def _succeeded(ctx: Context, job: FinetuneJob, result: Any, how: str = "") -> str:
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


def _raised(ctx: Context, job: FinetuneJob, owner: str, exc: Exception) -> str:
    """A job that raised ``exc``: given back on a transient fault, else failed with a message
    the user can act on."""
    reason = transient_reason(exc)
    if reason is not None:
        log.warning("fine-tune %s hit a transient fault", job.id, exc_info=exc)
        ctx.release(FinetuneJob, job.id, owner, reason)
        return "released"
    log.error("fine-tune %s raised", job.id, exc_info=exc)
    _fail(ctx, job, owner, user_message(exc, storage_root=ctx.files.root, what="fine-tune"))
    return "failed"


def _train(
    ctx: Context, job: FinetuneJob, params: FinetuneParams, image_keys: list[str], lease: Lease
) -> Any:
    """Train (resuming from the job's checkpoint); the core's FinetuneResult, or None when the
    run stopped early (canceled, lease lost, worker stopping or stalled)."""
    from tuneqdm_core.finetune import FinetuneCanceled, Subject, finetune

    checkpoint_dir = ctx.files.checkpoint_dir(job.tenant_id, job.id)
    subject = Subject(
        instance_prompt=job.instance_prompt,
        images=[ctx.files.fetch(key) for key in image_keys],
        class_prompt=job.class_prompt,
    )
    config = finetune_config(params, job.id)
    write = ProgressWriter(lease, every_s=min(1.0, ctx.settings.heartbeat_s), clock=time.monotonic)
    deadline = Deadline(job.started_at, job.time_limit_s, "TUNEQDM_FINETUNE_TIME_LIMIT_S")
    first = True
    last = time.perf_counter()

    def class_images(done: int, total: int) -> None:
        lease.touch()  # each chunk of class images is progress too
        log.info("fine-tune %s: class images %d/%d", job.id, done, total)

    def progress(p: Any) -> None:
        nonlocal first, last
        ctx.files.save_checkpoint(job.tenant_id, job.id)  # the previous step's save, if any
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

    sampling = sampling_for(ctx, params)

    def sample_step(done: int, total: int) -> None:
        lease.touch()  # each denoising step of the progress images is progress too

    def samples(step: int, images: list[Any]) -> None:
        lease.touch()
        if not store_samples(ctx, job, params, lease, step, images):
            log.info("fine-tune %s lost its lease while storing samples", job.id)

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
            _fail(ctx, job, lease.owner, deadline.message("fine-tune", "fewer steps"))
            ctx.files.drop_checkpoint(job.tenant_id, job.id)
            return "failed"
        log.info("fine-tune %s stopped at step %d", job.id, stop.step)
        if not lease.should_stop():
            # A pausing worker saved the step it stopped at: the next worker resumes from it.
            # (One that lost its lease uploads nothing over its successor's checkpoint.)
            ctx.files.save_checkpoint(job.tenant_id, job.id)
        return None
    return result


def sampling_for(ctx: Context, params: FinetuneParams) -> Any:
    """The core's Sampling for the job's validation prompts (None without any): the base's
    native size, TUNEQDM_SAMPLE_STEPS, prompt i with seed SAMPLE_SEED + i at every step."""
    if not params.validation_prompts or params.sample_every is None:
        return None
    from tuneqdm_core.finetune import Sampling

    base = ctx.runtime.base
    return Sampling(
        prompts=list(params.validation_prompts),
        every=params.sample_every,
        size=loaded_info(ctx.settings, base).native_resolution,
        steps=ctx.settings.sample_steps,
        seed=SAMPLE_SEED,
        precision=ctx.settings.generation_dtype,
    )


def store_samples(
    ctx: Context,
    job: FinetuneJob,
    params: FinetuneParams,
    lease: Lease,
    step: int,
    images: list[Any],
) -> bool:
    """Write the PNGs of one sampling point, then, only while the lease holds, their rows and
    a `samples` event in one transaction. A (step, prompt) that has a row already (a resumed
    job sampling a step again) adds nothing, not even a file. False when the lease is lost."""

    def existing(session: Session) -> set[int]:
        query = select(FinetuneSample.prompt_index).where(
            FinetuneSample.job_id == job.id, FinetuneSample.step == step
        )
        return set(session.scalars(query))

    with ctx.sessions() as session:
        have = existing(session)
    written: dict[int, tuple[str, int]] = {}
    for index, image in enumerate(images):
        if index in have:
            continue
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = st.finetune_sample_key(job.tenant_id, job.id, step, index)
        ctx.storage.put(key, buffer.getvalue())  # the collector removes it if no row follows
        written[index] = (key, len(buffer.getvalue()))
    with ctx.sessions() as session:
        # The lease check first: it locks the job's row, so a canceled job gets no more rows
        # and this transaction's event is in order.
        if not write_owned(session, FinetuneJob, job.id, lease.owner, commit=False):
            session.rollback()
            lease.lost.set()
            return False
        new = sorted(set(written) - existing(session))
        for index in new:
            key, size = written[index]
            session.add(
                FinetuneSample(
                    job_id=job.id,
                    step=step,
                    prompt_index=index,
                    prompt=params.validation_prompts[index],
                    seed=SAMPLE_SEED + index,
                    storage_key=key,
                    size_bytes=size,
                )
            )
        if new:
            record_event(session, job.id, "samples", step=step, prompt_indexes=new)
        session.commit()
    return True


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
        save_adapter(
            trained,
            path,
            extra={"tokens": [job.token], "instance_prompt": job.instance_prompt, "job": job.id},
        )
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


def _after_stop(ctx: Context, job: FinetuneJob, lease: Lease) -> str:
    """A run that stopped early: a canceled job drops its checkpoint and tells its webhook; a
    stopping worker gives the job back (not counted as an attempt) for the next worker to
    resume at once; a stalled one was given back by its watchdog; a taken-over one does
    nothing (its new worker continues from the checkpoint)."""
    if lease.stalled.is_set():
        return "stalled"
    with ctx.sessions() as session:
        status = session.get(FinetuneJob, job.id)
        if status is not None and status.status == "canceled":
            ctx.files.drop_checkpoint(job.tenant_id, job.id)
            ctx.notify(job.id)
            finetune_ended(ctx.sessions, ctx.storage, ctx.settings, job.tenant_id, job.id)
            return "stopped"
    if SHUTDOWN.is_set() and not lease.lost.is_set():
        ctx.release(FinetuneJob, job.id, lease.owner, None)
        return "released"
    return "stopped"
