"""Co-training: one worker trains up to TUNEQDM_COTRAIN_MAX fine-tunes in one loop.

A fine-tune on its first attempt does not train alone: its worker claims more queued fine-tunes
that can share its UNet calls (the same base, so the same family — SD, SDXL, SD3 or FLUX — and
`tuneqdm_core.cotrain.group_key`: method, resolution, precision and checkpointing) and trains
them all with one `CoTrainer`; between steps it claims more while there is room. Claims follow
the tenants' fair pick, one place per tenant in turn (`claim_compatible`). Everything else
stays per job, as in the solo path (worker/training.py): lease and heartbeat, progress writes,
checkpoint folder, cancel flag, time limit, attempts, publishing. A job that finishes, fails or
is canceled leaves after its step and is published or ended at once; the others go on. The
claimed jobs' own messages later find them taken (claim_next's skip).

A job on its second attempt or later trains alone (worker/finetunes.py), so a job that kills
its worker takes other tenants' jobs down with it at most once. A failure of the shared step
itself (out of memory) gives every member back for another attempt, alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app import storage as st
from app.models import FinetuneJob
from app.schemas import FinetuneParams
from worker import metrics
from worker.bases import loaded_info
from worker.bounds import Deadline, stop_check
from worker.context import Context
from worker.failures import transient_reason
from worker.jobs import SHUTDOWN, Lease, ProgressWriter, claim, fairest_queued, new_owner
from worker.training import (
    BASE_FAILED,
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

# A group with room looks for compatible queued jobs this often (one query), between steps.
JOIN_POLL_S = 2.0
# Queued fine-tunes read per look, in fair order; compatibility is judged on their params.
CANDIDATES = 64


def claim_compatible(
    session: Session,
    *,
    base: str,
    room: int,
    taken: list[str],
    exclude: list[str],
    fits: Callable[[dict[str, Any]], bool],
    stale_after_s: float,
) -> list[tuple[str, str, int]]:
    """Claim up to `room` queued first-attempt fine-tunes whose params `fits` the group, as
    (job id, owner, attempt). `taken` holds the tenant of every job already in the group.

    Places go round-robin across tenants in fair order (worker/jobs.py `fairest_queued`): every
    tenant with a compatible job gets its first place before any tenant gets its next one, and
    a tenant already in the group counts its places there, so one tenant's backlog never fills
    the group while another's job waits. A job another worker claims first is passed over."""
    # The one query of a group's look: the worker's base, then what the group must share.
    ids = fairest_queued(
        session,
        FinetuneJob,
        limit=CANDIDATES,
        base=base,
        where=[FinetuneJob.attempts == 0, FinetuneJob.id.not_in(exclude)],
    )
    if not ids:
        session.commit()
        return []
    rows = {
        row.id: row
        for row in session.execute(
            select(FinetuneJob.id, FinetuneJob.tenant_id, FinetuneJob.params).where(
                FinetuneJob.id.in_(ids)
            )
        )
    }
    session.commit()
    tenants: list[str] = []  # in fair order of their first candidate
    places = {tenant: taken.count(tenant) for tenant in set(taken)}
    ranked = []
    for position, job_id in enumerate(ids):
        row = rows.get(job_id)
        if row is None or not fits(row.params):
            continue
        if row.tenant_id not in tenants:
            tenants.append(row.tenant_id)
        turn = places.get(row.tenant_id, 0)
        places[row.tenant_id] = turn + 1
        ranked.append((turn, tenants.index(row.tenant_id), position, job_id))
    won: list[tuple[str, str, int]] = []
    for *_, job_id in sorted(ranked):
        if len(won) >= room:
            break
        owner = new_owner()
        attempt = claim(session, FinetuneJob, job_id, owner, stale_after_s=stale_after_s, base=base)
        if attempt is not None:
            won.append((job_id, owner, attempt))
    return won


def hold(ctx: Context, job_id: str, owner: str) -> Lease:
    """The claimed job's lease, its heartbeat running (released by `Lease.__exit__`)."""
    return ctx.lease(FinetuneJob, job_id, owner).__enter__()


@dataclass
class _Member:
    job: FinetuneJob
    params: FinetuneParams
    owner: str
    attempt: int
    lease: Lease
    deadline: Deadline


class _Group:
    """The members of one worker's training loop and what ends each of them."""

    def __init__(self, ctx: Context, trainer: Any) -> None:
        self.ctx = ctx
        self.trainer = trainer
        self.members: dict[str, _Member] = {}
        self.ended: dict[str, str] = {}  # job id → outcome
        self.largest = 0

    # -- membership ----------------------------------------------------------------------

    def fits(self, first: FinetuneParams) -> Callable[[dict[str, Any]], bool]:
        """Whether stored params can share the UNet calls of a group started by `first`."""
        from tuneqdm_core.cotrain import group_key

        base = self.ctx.runtime.base
        device = base.device
        # Only this worker's base is ever claimed (claim_compatible), so base and family are
        # the same for every candidate; they are in the key so that a group can never mix
        # denoisers, whatever claims it one day.
        family = loaded_info(self.ctx.settings, base).family

        def key(params: FinetuneParams, job_id: str) -> Any:
            config = finetune_config(params, job_id).for_device(device)
            return (self.ctx.settings.base_model, family, *group_key(config))

        want = key(first, "")

        def fits(raw: dict[str, Any]) -> bool:
            try:
                params = FinetuneParams.model_validate(raw)
                # A job this worker refuses is claimed alone and failed there with its message;
                # one with progress images trains alone (the group loop makes none).
                return (
                    refusal(params, self.ctx.settings) is None
                    and not params.validation_prompts
                    and key(params, "") == want
                )
            except ValueError:
                return False

        return fits

    def fill(self, fits: Callable[[dict[str, Any]], bool]) -> None:
        """Claim compatible queued jobs while there is room, and let them join."""
        room = self.ctx.settings.cotrain_max - len(self.members)
        if room <= 0 or SHUTDOWN.is_set():
            return
        try:
            with self.ctx.sessions() as session:
                claimed = claim_compatible(
                    session,
                    base=self.ctx.settings.base_model,
                    room=room,
                    taken=[m.job.tenant_id for m in self.members.values()],
                    exclude=list(self.members),
                    fits=fits,
                    stale_after_s=self.ctx.settings.stale_after_s,
                )
                jobs = []
                for job_id, owner, attempt in claimed:
                    job = session.get(FinetuneJob, job_id)
                    assert job is not None
                    session.refresh(job)
                    jobs.append((job, owner, attempt, [img.storage_key for img in job.images]))
        except Exception:
            # The members train on; a job claimed before the error has no heartbeat, so the
            # sweep requeues it once its claim goes stale.
            log.exception("looking for fine-tunes to join the group failed")
            return
        for job, owner, attempt, image_keys in jobs:
            if job.webhook_url and self.ctx.pending_webhook(job.id):
                self.ctx.notify(job.id)  # its `running` webhook (worker/jobs.py claim)
            self.join(job, owner, attempt, image_keys)

    def join(
        self,
        job: FinetuneJob,
        owner: str,
        attempt: int,
        image_keys: list[str],
        lease: Lease | None = None,
    ) -> None:
        """Take `job`'s lease (unless given, already held) and add it to the loop; a job that
        cannot start (unreadable photos, canceled while its class images were made) ends here
        alone."""
        from tuneqdm_core.cotrain import CoJob
        from tuneqdm_core.finetune import Subject

        ctx = self.ctx
        params = FinetuneParams.model_validate(job.params)
        if lease is None:
            lease = hold(ctx, job.id, owner)
        deadline = Deadline(job.started_at, job.time_limit_s, "TUNEQDM_FINETUNE_TIME_LIMIT_S")
        member = _Member(job, params, owner, attempt, lease, deadline)

        def class_images(done: int, total: int) -> None:
            for other in [member, *self.members.values()]:
                other.lease.touch()  # the whole loop waits for these: progress for all
            lease.enter_phase("making class images")
            log.info("fine-tune %s: class images %d/%d", job.id, done, total)

        try:
            lease.enter_phase("preparing photos")
            checkpoint_dir = ctx.files.checkpoint_dir(job.tenant_id, job.id)
            self.trainer.add(
                CoJob(
                    key=job.id,
                    subjects=[
                        Subject(
                            instance_prompt=job.instance_prompt,
                            images=[ctx.files.fetch(key) for key in image_keys],
                            class_prompt=job.class_prompt,
                        )
                    ],
                    config=finetune_config(params, job.id),
                    checkpoint_dir=checkpoint_dir,
                    cache_dir=ctx.settings.resolved_quant_cache_dir / "class-images",
                    progress=self._progress(member),
                    should_cancel=stop_check(lease.should_stop, deadline),
                    on_class_images=class_images,
                )
            )
        except Exception as exc:
            self._end(member, error=exc)
            return
        lease.enter_phase("training")
        self.members[job.id] = member
        self.largest = max(self.largest, len(self.members))
        log.info("fine-tune %s joined a co-training group of %d", job.id, len(self.members))
        self._write_sizes()

    def _progress(self, member: _Member) -> Callable[[Any], None]:
        write = ProgressWriter(
            member.lease, every_s=min(1.0, self.ctx.settings.heartbeat_s), clock=time.monotonic
        )
        first = True

        def progress(p: Any) -> None:
            nonlocal first
            job = member.job
            if not save_checkpoint(self.ctx, job, member.lease):  # the previous step's save
                return
            if first:
                # The first step of this run tells where it started: 0, or a checkpoint's step.
                first = False
                write(p.step, p.total, p.loss, resumed_from_step=p.step - 1)
            else:
                write(p.step, p.total, p.loss)

        return progress

    def _write_sizes(self) -> None:
        size = len(self.members)
        for member in self.members.values():
            member.lease.write(group_size=size if size > 1 else None)

    def leave(self, outcomes: list[Any]) -> None:
        """Members the trainer let go after a step: publish or end each; the others' rows then
        show the smaller group."""
        for outcome in outcomes:
            member = self.members.pop(outcome.key)
            self._end(member, result=outcome.result, error=outcome.error)
        if outcomes and self.members:
            self._write_sizes()

    # -- ending one member ---------------------------------------------------------------

    def _end(self, member: _Member, result: Any = None, error: BaseException | None = None) -> None:
        job = member.job
        try:
            self.ended[job.id] = self._outcome(member, result, error)
        finally:
            member.lease.__exit__(None, None, None)
            # Local copies of its photos and checkpoint (none with the local backend).
            self.ctx.files.discard(st.finetune_prefix(job.tenant_id, job.id))

    def _outcome(self, member: _Member, result: Any, error: BaseException | None) -> str:
        from tuneqdm_core.finetune import FinetuneCanceled

        ctx, job, lease = self.ctx, member.job, member.lease
        try:
            if isinstance(error, FinetuneCanceled):
                if member.deadline.passed() and not lease.should_stop():
                    log.warning("fine-tune %s passed its time limit at step %d", job.id, error.step)
                    fail(
                        ctx, job, member.owner, member.deadline.message("fine-tune", "fewer steps")
                    )
                    ctx.files.drop_checkpoint(job.tenant_id, job.id)
                    return "failed"
                log.info("fine-tune %s stopped at step %d", job.id, error.step)
                if not lease.should_stop():
                    save_checkpoint(ctx, job, lease)  # its last saved step
                return after_stop(ctx, job, lease)
            if error is not None:
                raise error
            if not lease.enter_phase("saving") or not publish_adapter(
                ctx, job, member.params, result, member.owner, member.attempt
            ):
                return after_stop(ctx, job, lease)
        except Exception as exc:
            return raised(ctx, job, member.owner, exc)
        return succeeded(ctx, job, result, ", co-trained")

    # -- the whole group -----------------------------------------------------------------

    def pause_all(self) -> None:
        """The worker is stopping: every member saves its step and is given back (not counted
        as an attempt), for the next worker to resume at once."""
        for job_id, member in list(self.members.items()):
            del self.members[job_id]
            try:
                step = self.trainer.pause(job_id)
                save_checkpoint(self.ctx, member.job, member.lease)
                log.info("fine-tune %s paused at step %d (worker stopping)", job_id, step)
                self.ctx.release(FinetuneJob, job_id, member.owner, None)
                self.ended[job_id] = "released"
            except Exception as exc:
                self.ended[job_id] = raised(self.ctx, member.job, member.owner, exc)
            finally:
                member.lease.__exit__(None, None, None)

    def give_back_all(self, exc: BaseException) -> None:
        """The shared step failed: no member can be blamed, so each gets another attempt (a
        counted one; on it the job trains alone)."""
        reason = transient_reason(exc) if isinstance(exc, Exception) else None
        if reason is None:
            reason = f"its co-training group failed ({type(exc).__name__}); it runs alone next"
        for job_id, member in list(self.members.items()):
            del self.members[job_id]
            with contextlib.suppress(KeyError):  # it may have left the trainer already
                self.trainer.remove(job_id)
            self.ctx.release(FinetuneJob, job_id, member.owner, reason)
            member.lease.__exit__(None, None, None)
            self.ended[job_id] = "released"


def _train(
    group: _Group,
    first: FinetuneJob,
    owner: str,
    attempt: int,
    image_keys: list[str],
    lease: Lease,
) -> None:
    trainer = group.trainer
    begun = time.perf_counter()
    group.join(first, owner, attempt, image_keys, lease)
    fits = group.fits(FinetuneParams.model_validate(first.params))
    group.fill(fits)
    looked = time.monotonic()
    measured = False  # the first step after a join warms caches: not measured
    while group.members:
        if SHUTDOWN.is_set():
            group.pause_all()
            return
        started = time.perf_counter()
        try:
            left = trainer.step()
        except Exception as exc:
            log.exception("the co-training step of %s failed", ", ".join(group.members))
            group.give_back_all(exc)
            return
        base = group.ctx.settings.base_model
        if measured:
            metrics.finetune_step(base, time.perf_counter() - started)
        elif begun:  # the group's first step: photos encoded, first step taken
            metrics.first_step(base, time.perf_counter() - begun)
            begun = 0.0
        measured = True
        group.leave(left)
        if group.members and time.monotonic() - looked >= JOIN_POLL_S:
            before = len(group.members)
            group.fill(fits)
            looked = time.monotonic()
            measured = measured and len(group.members) == before


def run_group(
    ctx: Context, first: FinetuneJob, owner: str, attempt: int, image_keys: list[str]
) -> str:
    """Train `first` (claimed, first attempt) and the compatible jobs this worker claims along
    the way; returns what happened to each (for logs and tests)."""
    # Held first: importing torch and loading the base may take longer than a lease lasts.
    lease = hold(ctx, first.id, owner)
    try:
        from tuneqdm_core.cotrain import cotraining

        if not ctx.runtime.loaded:
            lease.enter_phase("loading base")
        base = ctx.runtime.base
    except Exception:
        log.exception("the base model could not be loaded")
        fail(ctx, first, owner, BASE_FAILED)
        lease.__exit__(None, None, None)
        return "failed"
    with cotraining(base) as trainer:
        group = _Group(ctx, trainer)
        try:
            _train(group, first, owner, attempt, image_keys, lease)
        except BaseException as exc:
            # Whatever broke the loop, no member may keep renewing a lease nobody trains for.
            log.exception("co-training stopped")
            group.give_back_all(exc)
            raise
    outcomes = list(group.ended.values())
    if len(outcomes) == 1:
        return outcomes[0]
    counts = {o: outcomes.count(o) for o in dict.fromkeys(outcomes)}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items())
    return f"{summary} (co-trained, group of {group.largest})"
