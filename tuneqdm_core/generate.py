"""Text-to-image sampling on a quantized base, many adapters in one denoising loop.

Requests that share steps, size and scheduler run as one batch: each image reads its
adapter's slot of a :class:`~tuneqdm_core.routing.ScaleBank` (slot 0 is the plain base) and,
at every step, the interval of the current timestep. Each image draws its initial noise from
its own seeded generator, so a batch gives the images its requests give one by one.

The loop, its schedulers and the conditioning are the family's
(:meth:`~tuneqdm_core.families.base.Family.generate`): the UNet families run their own loop
(:mod:`tuneqdm_core.families.sd`, SDXL's added conditioning in :mod:`~tuneqdm_core.families.sdxl`),
a transformer family its diffusers pipeline (:mod:`tuneqdm_core.families.flow`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image

from tuneqdm_core.adapter import Adapter
from tuneqdm_core.base import BaseModel
from tuneqdm_core.families.sd import SCHEDULERS as SCHEDULERS  # the UNet families' schedulers
from tuneqdm_core.routing import ScaleBank

# "auto": bf16 on CUDA (fp16 on GPUs without bf16), fp32 elsewhere. Sampling needs no
# gradients, so half precision costs only rounding; the scales keep float32 (layers.py).
Precision = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def autocast_dtype(precision: Precision, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype sampling runs in on ``device`` (None: float32, no autocast)."""
    if precision not in ("auto", "fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if precision == "auto":
        if torch.device(device).type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES.get(precision)


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    adapter: Adapter | None = None
    negative_prompt: str = ""
    num_images: int = 1
    steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    scheduler: str = "ddim"

    def loop_key(self) -> tuple[int, int, int, str]:
        """Requests with equal keys can share one denoising loop."""
        return (self.steps, self.width, self.height, self.scheduler)


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int


def check_request(base: BaseModel, request: GenerationRequest) -> None:
    base.family.check_request(base, request)


@torch.no_grad()
def generate(
    base: BaseModel,
    requests: Sequence[GenerationRequest],
    *,
    bank: ScaleBank | None = None,
    on_step: Callable[[int, int], None] | None = None,
    precision: Precision = "fp32",
    should_cancel: Callable[[], bool] | None = None,
) -> list[list[GeneratedImage]]:
    """Images for each request, in order. Requests are grouped by :meth:`loop_key`; each group
    runs one loop. ``bank`` (optional) is reused for the adapters, else one is made.
    ``precision`` is the autocast dtype of text encoder, UNet and VAE (:func:`autocast_dtype`).

    ``should_cancel`` is asked before every UNet block (:mod:`tuneqdm_core.cancel`); when it
    returns true, :class:`~tuneqdm_core.cancel.Canceled` is raised within one UNet call."""
    dtype = autocast_dtype(precision, base.device)
    return base.family.generate(
        base,
        requests,
        bank=bank,
        on_step=on_step,
        dtype=dtype,
        should_cancel=should_cancel,
    )


def slots_for(
    base: BaseModel, requests: Sequence[GenerationRequest], bank: ScaleBank | None
) -> tuple[ScaleBank, list[int]]:
    adapters: list[Adapter] = []
    for request in requests:
        if request.adapter is not None and all(a is not request.adapter for a in adapters):
            adapters.append(request.adapter)
    if bank is None or bank.slots < len(adapters) + 1:
        intervals = max([a.config.intervals for a in adapters] + [1])
        bank = ScaleBank(
            base.unet,
            slots=len(adapters) + 1,
            max_intervals=intervals,
            num_train_timesteps=base.num_train_timesteps,
        )
    bank.reset(0)
    for slot, adapter in enumerate(adapters, start=1):
        bank.load(slot, adapter)
    slots = [
        0 if r.adapter is None else 1 + next(i for i, a in enumerate(adapters) if a is r.adapter)
        for r in requests
    ]
    return bank, slots
