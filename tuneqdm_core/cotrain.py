"""Co-batched fine-tuning: several jobs' adapters trained in one loop over one shared base.

An adapter is a set of scale vectors routed per sample (:mod:`tuneqdm_core.routing`), so the
samples of K fine-tunes can go through the quantized UNet as one batch, each reading its own
job's adapter at its own timestep's interval. Everything else stays per job, as in
:func:`~tuneqdm_core.finetune.finetune`: data, optimizer, random generator, step count, losses,
checkpoints, cancel check and progress callback.

Why each step of a job trained in a group is the step of the same job trained alone:

- each job draws its batch from its own generator with :func:`draw_batch`, in the same order
  as the solo loop;
- the total loss is the sum of each job's own loss (its own mean over its own samples), and a
  job's scales only touch its own samples, so the gradient of job j's scales is the gradient of
  job j's loss alone — the other jobs' samples cannot reach it;
- clipping, loss scaling and the optimizer step are per job, on that job's parameters only.

What differs is only the order of floating-point sums inside batched kernels: per step within
1e-10 relative in float64, but Adam amplifies it over many steps (2.98e-7 relative after 20
float64 steps at high learning rates, 1.9e-13 at the defaults) and float32 losses differ by up
to 8.7e-5 after 3 steps (docs/library.md).

A step interrupted inside the UNet (a member canceled mid-call) is undone for everyone: the
generators are rewound, no optimizer steps, and the canceled members leave; the next step
repeats the same draws for the others.

A worker drives it::

    trainer = CoTrainer(base)
    trainer.add(CoJob("a", subjects_a, config_a))
    while trainer:
        for left in trainer.step():  # finished, canceled or failed members
            ...
        # trainer.add(...) a newly claimed job: it joins at the next step
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneqdm_core.base import BaseModel
from tuneqdm_core.cancel import Canceled, cancel_checks
from tuneqdm_core.checkpoints import (
    CHECKPOINT_NAME,
    checkpoint_due,
    restore_checkpoint,
    save_checkpoint,
)
from tuneqdm_core.finetune import FinetuneCanceled, FinetuneResult, Progress
from tuneqdm_core.finetune_config import ADAPTERLESS_METHODS, FinetuneConfig
from tuneqdm_core.routing import route_adapters, routed
from tuneqdm_core.training_data import Subject, TrainingData, prepare_data
from tuneqdm_core.training_step import (
    Batch,
    TrainingRun,
    draw_batch,
    start_run,
    training_autocast,
    training_loss,
    training_mode,
    training_schedule,
)


@dataclass(frozen=True)
class CoJob:
    """One fine-tune to train in a group; the arguments of
    :func:`~tuneqdm_core.finetune.finetune`, plus ``key``, the caller's name for it."""

    key: str
    subjects: Sequence[Subject]
    config: FinetuneConfig
    checkpoint_dir: str | Path | None = None
    cache_dir: str | Path | None = None
    progress: Callable[[Progress], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    on_class_images: Callable[[int, int], None] | None = None


@dataclass
class CoOutcome:
    """A member that left the group: ``result`` when it finished, else ``error`` (a
    :class:`~tuneqdm_core.finetune.FinetuneCanceled` when canceled)."""

    key: str
    result: FinetuneResult | None = None
    error: BaseException | None = None


def group_key(config: FinetuneConfig) -> tuple[Any, ...]:
    """What jobs must share to go through the UNet as one batch: the method family (the float
    UNet of ``full`` cannot be shared), the resolution (latents are concatenated), and the
    forward's precision and checkpointing. Everything else may differ per job. The base is
    the trainer's own, so jobs of different bases or families (SD, SDXL, SD3, FLUX) never
    meet; an SDXL group concatenates its members' added conditioning (pooled text, time ids)
    like their text states."""
    return (config.method, config.resolution, config.mixed_precision, config.gradient_checkpointing)


@dataclass
class _Member:
    job: CoJob
    config: FinetuneConfig  # made concrete for the device
    data: TrainingData
    run: TrainingRun
    checkpoint: Path | None
    resumed_from: int
    started: float  # perf_counter() when add() began


class CoTrainer:
    """Trains the adapters of several fine-tunes on ``base`` in one loop (see the module
    docstring). Not thread-safe: one caller adds, removes and steps."""

    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self._members: list[_Member] = []
        self._key: tuple[Any, ...] | None = None
        # The family's schedule draws the timesteps (a transformer family's: sigmas).
        self._scheduler, self._total_t, self._schedule = training_schedule(base)
        self._training: ExitStack | None = None

    def __len__(self) -> int:
        return len(self._members)

    @property
    def keys(self) -> list[str]:
        return [m.job.key for m in self._members]

    def accepts(self, config: FinetuneConfig) -> bool:
        """Whether a job with ``config`` can join this group."""
        key = group_key(config.for_device(self.base.device))
        return config.method not in ADAPTERLESS_METHODS and (self._key is None or key == self._key)

    def add(self, job: CoJob) -> None:
        """Prepare ``job`` (its photos, class images, checkpoint) and let it join at the next
        step. Raises ``ValueError`` for a job that cannot share this group's forward pass and
        :class:`FinetuneCanceled` when it is canceled while its class images are made."""
        started = time.perf_counter()  # elapsed and ETA count the preparation, as finetune()'s
        if not job.subjects:
            raise ValueError(f"job {job.key!r}: no subjects given")
        if job.key in self.keys:
            raise ValueError(f"job {job.key!r} is already in the group")
        if job.config.method in ADAPTERLESS_METHODS:
            raise ValueError(
                f"method {job.config.method!r} trains no scale adapter to share a forward pass "
                "with; fine-tune it alone"
            )
        config = job.config.for_device(self.base.device)
        if self._key is not None and group_key(config) != self._key:
            raise ValueError(
                f"job {job.key!r} has (method, resolution, precision, checkpointing) "
                f"{group_key(config)}, the group {self._key}; train it in another group"
            )
        # Encoding photos and making class images need the VAE, text encoder and an eval-mode
        # UNet: leave training mode while preparing (only when someone joins).
        self._leave_training()
        try:
            data = prepare_data(
                self.base,
                job.subjects,
                config,
                Path(job.cache_dir) if job.cache_dir else None,
                job.should_cancel,
                job.on_class_images,
            )
        except FinetuneCanceled:
            raise
        except Canceled:
            raise FinetuneCanceled(0) from None
        run = start_run(self.base, config)
        checkpoint = Path(job.checkpoint_dir) / CHECKPOINT_NAME if job.checkpoint_dir else None
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None and checkpoint.is_file():
            restore_checkpoint(run, checkpoint, config, self.base)
        self._key = group_key(config)
        self._members.append(_Member(job, config, data, run, checkpoint, run.step, started))

    def remove(self, key: str) -> int:
        """Take job ``key`` out of the group without a result (its worker gave it up); returns
        its last completed step. Its checkpoint, if any, is where it resumes, alone or in
        another group."""
        member = next((m for m in self._members if m.job.key == key), None)
        if member is None:
            raise KeyError(f"job {key!r} is not in the group")
        self._drop(member)
        return member.run.step

    def pause(self, key: str) -> int:
        """Checkpoint job ``key`` at its last completed step and take it out of the group (a
        worker asked to stop, as ``finetune(should_pause=...)``); returns that step. A later
        run resumes exactly there."""
        member = next((m for m in self._members if m.job.key == key), None)
        if member is None:
            raise KeyError(f"job {key!r} is not in the group")
        if member.checkpoint is not None and member.run.step > member.resumed_from:
            save_checkpoint(member.run, member.checkpoint, member.config, self.base)
        self._drop(member)
        return member.run.step

    def step(self) -> list[CoOutcome]:
        """One optimizer step for every member; returns the members that left during it
        (finished, canceled or failed). A failure of the shared forward/backward pass (out of
        memory, say) is raised with every member's state as before the step."""
        left = [self._cancel(m) for m in list(self._members) if _asked_to_cancel(m)]
        if not self._members:
            self._leave_training()
            return left
        self._enter_training()
        members = list(self._members)
        states = [m.run.generator.get_state() for m in members]
        try:
            batches = [
                draw_batch(m.data, m.config, m.run.generator, self._total_t, self._schedule)
                for m in members
            ]
            losses = self._forward_backward(members, batches)
        except Canceled:
            self._undo(members, states)
            # Stopped inside the UNet: the canceled members leave; the others repeat the step.
            return left + [self._cancel(m) for m in members if _asked_to_cancel(m)]
        except BaseException:
            self._undo(members, states)
            raise
        for member, loss in zip(members, losses, strict=True):
            try:
                self._finish_step(member, loss)
            except Exception as error:  # e.g. its checkpoint could not be written
                self._drop(member)
                left.append(CoOutcome(member.job.key, error=error))
                continue
            if member.run.step >= member.config.steps:
                self._drop(member)
                left.append(CoOutcome(member.job.key, result=self._result(member)))
        if not self._members:
            self._leave_training()
        return left

    def run(self) -> list[CoOutcome]:
        """Step until every member has left; the outcomes in the order they left."""
        outcomes: list[CoOutcome] = []
        while self._members:
            outcomes += self.step()
        return outcomes

    def close(self) -> None:
        """Leave training mode (the base serves generations again); members stay."""
        self._leave_training()

    # -- internals -------------------------------------------------------------------------

    def _forward_backward(
        self, members: Sequence[_Member], batches: Sequence[Batch]
    ) -> list[torch.Tensor]:
        family = self.base.family
        noisy, targets, inputs, slots = [], [], [], []
        for slot, (member, batch) in enumerate(zip(members, batches, strict=True)):
            x, target, member_inputs = family.training_inputs(
                self.base, member.data, batch, self._scheduler
            )
            noisy.append(x)
            targets.append(target)
            inputs.append(member_inputs)
            slots += [slot] * batch.rows.shape[0]
        adapters = [m.run.adapter for m in members if m.run.adapter is not None]
        assert len(adapters) == len(members)  # "full" never joins
        total = adapters[0].config.num_train_timesteps
        timesteps = family.tas_timesteps(torch.cat([b.timesteps for b in batches]), total)
        route = route_adapters(adapters, timesteps, torch.tensor(slots))
        for member in members:
            member.run.optimizer.zero_grad(set_to_none=True)
        config = members[0].config
        with (
            cancel_checks(self.base.unet, self._any_canceled(members)),
            routed(self.base.unet, route),
        ):
            with training_autocast(config, self.base.device):
                # Text states of equal length for every member (one tokenizer length each).
                prediction = family.denoise(
                    self.base, self.base.unet, torch.cat(noisy), _cat_inputs(inputs)
                )
            losses = [
                training_loss(part, target, m.config)
                for part, target, m in zip(
                    prediction.split([x.shape[0] for x in noisy]), targets, members, strict=True
                )
            ]
            # Each job's loss scaled by its own scaler: a job's scales only see its own term.
            scaled = [m.run.scaler.scale(loss) for m, loss in zip(members, losses, strict=True)]
            torch.stack(scaled).sum().backward()
        return losses

    def _finish_step(self, member: _Member, loss: torch.Tensor) -> None:
        """The rest of :func:`~tuneqdm_core.training_step._optimizer_step` and of the solo loop,
        for one member whose gradient is in place."""
        run, config = member.run, member.config
        if config.max_grad_norm > 0:
            run.scaler.unscale_(run.optimizer)
            torch.nn.utils.clip_grad_norm_(
                [p for p in run.params if p.grad is not None], config.max_grad_norm
            )
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.losses.append(float(loss.detach()))
        run.step += 1
        if member.job.progress is not None:
            elapsed = time.perf_counter() - member.started
            eta = elapsed / max(1, run.step - member.resumed_from) * (config.steps - run.step)
            member.job.progress(Progress(run.step, config.steps, run.losses[-1], elapsed, eta))
        if member.checkpoint is not None and checkpoint_due(config, run.step):
            save_checkpoint(run, member.checkpoint, config, self.base)

    def _result(self, member: _Member) -> FinetuneResult:
        adapter = member.run.adapter
        assert adapter is not None
        adapter.requires_grad_(False)
        return FinetuneResult(
            adapter=adapter,
            unet=None,
            losses=member.run.losses,
            seconds=time.perf_counter() - member.started,
            resumed_from=member.resumed_from,
        )

    def _undo(self, members: Sequence[_Member], states: Sequence[torch.Tensor]) -> None:
        for member, state in zip(members, states, strict=True):
            member.run.generator.set_state(state)
            member.run.optimizer.zero_grad(set_to_none=True)

    def _cancel(self, member: _Member) -> CoOutcome:
        self._drop(member)
        return CoOutcome(member.job.key, error=FinetuneCanceled(member.run.step))

    def _drop(self, member: _Member) -> None:
        self._members.remove(member)
        member.run.optimizer.zero_grad(set_to_none=True)
        if not self._members:
            self._key = None

    @staticmethod
    def _any_canceled(members: Sequence[_Member]) -> Callable[[], bool] | None:
        checks = [m.job.should_cancel for m in members if m.job.should_cancel is not None]
        if not checks:
            return None
        return lambda: any(check() for check in checks)

    def _enter_training(self) -> None:
        if self._training is None:
            stack = ExitStack()
            stack.enter_context(training_mode(self.base, self.base.unet, self._members[0].config))
            self._training = stack

    def _leave_training(self) -> None:
        if self._training is not None:
            stack, self._training = self._training, None
            stack.close()


def _cat_inputs(inputs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The members' model inputs (tensors, or dicts of tensors: SDXL's added conditioning)
    as one batch."""
    merged: dict[str, Any] = {}
    for name, first in inputs[0].items():
        parts = [i[name] for i in inputs]
        merged[name] = _cat_inputs(parts) if isinstance(first, dict) else torch.cat(parts)
    return merged


def _asked_to_cancel(member: _Member) -> bool:
    return member.job.should_cancel is not None and bool(member.job.should_cancel())


@contextmanager
def cotraining(base: BaseModel) -> Iterator[CoTrainer]:
    """A :class:`CoTrainer` that leaves training mode on the way out, whatever happens."""
    trainer = CoTrainer(base)
    try:
        yield trainer
    finally:
        trainer.close()


def cotrain(base: BaseModel, jobs: Sequence[CoJob]) -> dict[str, CoOutcome]:
    """Train ``jobs`` together from the start until each has left; outcomes by key."""
    with cotraining(base) as trainer:
        for job in jobs:
            trainer.add(job)
        return {outcome.key: outcome for outcome in trainer.run()}
