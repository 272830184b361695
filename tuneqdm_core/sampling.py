"""Progress images: a few images from the adapter as trained so far, made between steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from tuneqdm_core.base import BaseModel
from tuneqdm_core.generate import GenerationRequest, Precision, generate
from tuneqdm_core.training_step import TrainingRun


@dataclass(frozen=True)
class Sampling:
    """Images to look at while training: after every ``every`` steps and after the last one,
    one image per prompt from the adapter as trained so far. Prompt ``i`` always uses seed
    ``seed + i``, so the images of one prompt differ only by the training between them.
    Sampling draws no number from the training's generator: the adapter is the same with or
    without it."""

    prompts: Sequence[str]
    every: int
    size: int
    steps: int = 20
    seed: int = 0
    guidance_scale: float = 7.5
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if not self.prompts or self.every < 1 or self.steps < 1 or self.size < 8:
            raise ValueError("sampling needs prompts, every >= 1, steps >= 1 and size >= 8")

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total


@contextmanager
def _inference(base: BaseModel, unet: Any) -> Iterator[None]:
    """Inside ``training_mode``: ``unet`` in eval mode with VAE and text encoder back on the
    accelerator for a moment, then training mode and offloading again."""
    unet.eval()
    if base.device.type != "cpu":
        base.vae.to(base.device)
        base.text_encoder.to(base.device)
    try:
        yield
    finally:
        if base.device.type != "cpu":
            base.vae.to("cpu")
            base.text_encoder.to("cpu")
            torch.cuda.empty_cache()
        unet.train()


def sample_images(
    base: BaseModel,
    run: TrainingRun,
    sampling: Sampling,
    on_step: Callable[[int, int], None] | None,
) -> list[Image.Image]:
    """One image per prompt with the current adapter (cancel checks are the training's)."""
    requests = [
        GenerationRequest(
            prompt=prompt,
            adapter=run.adapter,
            steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            seed=sampling.seed + i,
            width=sampling.size,
            height=sampling.size,
        )
        for i, prompt in enumerate(sampling.prompts)
    ]
    with _inference(base, run.unet):
        made = generate(base, requests, on_step=on_step, precision=sampling.precision)
    return [images[0].image for images in made]
