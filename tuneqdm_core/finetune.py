"""DreamBooth-style fine-tuning of TuneQDM / PEQA scales (or, for comparison, the float UNet).

The loop is written out as in diffusers' ``train_dreambooth.py``: latents → noise → per-sample
timestep → ``add_noise`` → ε (or v) target → MSE, plus the prior-preservation term on class
images the base model generated itself. Differences from the paper's code that matter:
every sample draws its own timestep and trains its own interval (batch > 1 and prior
preservation work), latents and text states are computed once, and all randomness comes from
one CPU generator saved in checkpoints, so a resumed run ends with the same adapter.

The pieces live in modules of their own: the settings in :mod:`tuneqdm_core.finetune_config`,
the data in :mod:`tuneqdm_core.training_data`, one step in :mod:`tuneqdm_core.training_step`,
checkpoints in :mod:`tuneqdm_core.checkpoints`, progress images in :mod:`tuneqdm_core.sampling`;
what callers use is importable from here.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from tuneqdm_core.adapter import Adapter
from tuneqdm_core.base import BaseModel
from tuneqdm_core.cancel import Canceled, cancel_checks
from tuneqdm_core.checkpoints import (
    CHECKPOINT_NAME,
    checkpoint_due,
    restore_checkpoint,
    save_checkpoint,
)
from tuneqdm_core.finetune_config import (
    ADAPTERLESS_METHODS,
    S_OUT_RELATIVE_LR,
    FinetuneConfig,
    FinetuneMethod,
    MixedPrecision,
    s_out_learning_rate,
)
from tuneqdm_core.lora import LoRA
from tuneqdm_core.sampling import Sampling, sample_images
from tuneqdm_core.training_data import CLASS_IMAGE_CHUNK, Subject, class_images, prepare_data
from tuneqdm_core.training_step import (
    draw_batch,
    start_run,
    train_step,
    training_mode,
    training_schedule,
)

__all__ = [
    "CHECKPOINT_NAME",
    "CLASS_IMAGE_CHUNK",
    "S_OUT_RELATIVE_LR",
    "FinetuneCanceled",
    "FinetuneConfig",
    "FinetuneMethod",
    "FinetuneResult",
    "MixedPrecision",
    "Progress",
    "Sampling",
    "Subject",
    "class_images",
    "finetune",
    "loss_trend",
    "s_out_learning_rate",
]


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float
    elapsed: float
    eta: float


@dataclass
class FinetuneResult:
    adapter: Adapter | None  # None for methods "lora" and "full"
    unet: Any | None  # the fine-tuned float UNet for method "full"
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    lora: LoRA | None = None  # method "lora": apply with ``lora.applied(base.unet)``


class FinetuneCanceled(Canceled):
    """Raised when ``should_cancel()`` returned true: between steps, inside a UNet call
    (:mod:`tuneqdm_core.cancel`) or between chunks of class images. ``step`` is the last
    completed step."""

    def __init__(self, step: int) -> None:
        super().__init__(f"fine-tune canceled after step {step}")
        self.step = step


def finetune(
    base: BaseModel,
    subjects: Sequence[Subject],
    config: FinetuneConfig,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_class_images: Callable[[int, int], None] | None = None,
    should_pause: Callable[[], bool] | None = None,
    sampling: Sampling | None = None,
    on_sample: Callable[[int, list[Image.Image], Adapter], None] | None = None,
    on_sample_step: Callable[[int, int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune on ``subjects`` (several subjects share one adapter, each with its own token).

    With ``checkpoint_dir``, the state is saved every ``config.checkpoint_every`` steps and a
    checkpoint found there is resumed from. ``cache_dir`` keeps generated class images.
    ``should_cancel`` is asked before every UNet block (training and class images) and
    between steps; when true, :class:`FinetuneCanceled` is raised. ``should_pause`` is asked
    after every step only: when true, the state is checkpointed and FinetuneCanceled raised, so
    a resumed run continues exactly where this one paused (a worker asked to stop).
    ``on_class_images(done, total)`` reports the class images of prior preservation as they are
    made.

    With ``sampling``, ``on_sample(step, images, adapter)`` receives one image per prompt at
    the steps :meth:`Sampling.due` names, before that step's checkpoint (so a run resumed from a
    checkpoint never skips the samples of its step; it may repeat those of later steps), and
    the adapter that made them: the one being trained, so save or copy it before returning;
    ``on_sample_step(done, total)`` reports its denoising steps. ``should_cancel`` stops
    sampling too.
    """
    if not subjects:
        raise ValueError("no subjects given")
    if sampling is not None and config.method in ADAPTERLESS_METHODS:
        raise ValueError(f"sampling needs an adapter; method {config.method} trains none")
    config = config.for_device(base.device)
    start_time = time.perf_counter()
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = prepare_data(
            base,
            subjects,
            config,
            Path(cache_dir) if cache_dir else None,
            should_cancel,
            on_class_images,
        )
    except FinetuneCanceled:
        raise
    except Canceled:
        raise FinetuneCanceled(0) from None
    run = start_run(base, config)
    if checkpoint is not None and checkpoint.is_file():
        restore_checkpoint(run, checkpoint, config, base)
    resumed_from = run.step
    noise_scheduler, total_t, schedule = training_schedule(base)
    with (
        training_mode(base, run.unet, config),
        cancel_checks(run.unet, should_cancel),
        run.lora.applied(run.unet) if run.lora is not None else nullcontext(),
    ):
        while run.step < config.steps:
            if should_cancel is not None and should_cancel():
                raise FinetuneCanceled(run.step)
            batch = draw_batch(data, config, run.generator, total_t, schedule)
            try:
                loss = train_step(base, run, data, batch, noise_scheduler, config)
            except FinetuneCanceled:
                raise
            except Canceled:
                # Stopped inside the UNet (or its recomputation in backward): this step never
                # happened; the last checkpoint stays the place to resume from.
                raise FinetuneCanceled(run.step) from None
            run.losses.append(loss)
            run.step += 1
            if progress is not None:
                elapsed = time.perf_counter() - start_time
                rate = elapsed / max(1, run.step - resumed_from)
                eta = rate * (config.steps - run.step)
                progress(Progress(run.step, config.steps, run.losses[-1], elapsed, eta))
            if sampling is not None and sampling.due(run.step, config.steps):
                try:
                    images = sample_images(base, run, sampling, on_sample_step)
                except FinetuneCanceled:
                    raise
                except Canceled:
                    # The step itself is done but not checkpointed: resuming repeats it.
                    raise FinetuneCanceled(run.step) from None
                if on_sample is not None:
                    assert run.adapter is not None  # sampling refuses method full above
                    on_sample(run.step, images, run.adapter)
            due = checkpoint_due(config, run.step)
            if checkpoint is not None and due:
                save_checkpoint(run, checkpoint, config, base)
            if should_pause is not None and run.step < config.steps and should_pause():
                if checkpoint is not None and not due:
                    save_checkpoint(run, checkpoint, config, base)
                raise FinetuneCanceled(run.step)
    if run.adapter is not None:
        run.adapter.requires_grad_(False)
    return FinetuneResult(
        adapter=run.adapter,
        unet=run.unet if config.method == "full" else None,
        losses=run.losses,
        seconds=time.perf_counter() - start_time,
        resumed_from=resumed_from,
        lora=run.lora.requires_grad_(False) if run.lora is not None else None,
    )


def loss_trend(losses: Sequence[float], window: int = 10) -> tuple[float, float]:
    """Mean loss of the first and last ``window`` steps (diffusion losses are noisy)."""
    window = max(1, min(window, math.ceil(len(losses) / 2)))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window
