"""Text-to-image sampling on a quantized base, many adapters in one denoising loop.

Requests that share steps, size and scheduler run as one batch: each image reads its
adapter's slot of a :class:`~tuneqdm_core.routing.ScaleBank` (slot 0 is the plain base) and,
at every step, the interval of the current timestep. Each image draws its initial noise from
its own seeded generator, so a batch gives the images its requests give one by one.

SDXL bases get SDXL's conditioning (:meth:`~tuneqdm_core.base.BaseModel.encode`): the pooled
text embedding and the time ids of an uncropped image at the requested size, for the prompt
and the negative prompt alike; an empty negative prompt is all-zero conditioning where the
model asks for it (``force_zeros_for_empty_prompt``), as diffusers' SDXL pipeline does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

from tuneqdm_core.adapter import Adapter
from tuneqdm_core.base import BaseModel, time_ids
from tuneqdm_core.cancel import cancel_checks
from tuneqdm_core.images import to_pil
from tuneqdm_core.routing import ScaleBank, routed

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


SCHEDULERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++"
    ),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
}


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
    if base.family is not None:
        base.family.check_request(base, request)
        return
    factor = base.vae_scale_factor
    if request.scheduler not in SCHEDULERS:
        raise ValueError(
            f"scheduler {request.scheduler!r} unknown; choose from {sorted(SCHEDULERS)}"
        )
    if request.width % factor or request.height % factor or min(request.width, request.height) < 8:
        raise ValueError(
            f"width and height must be multiples of {factor} and at least 8, "
            f"got {request.width}x{request.height}"
        )
    if request.num_images < 1 or request.steps < 1:
        raise ValueError("num_images and steps must be at least 1")


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
    if base.family is not None:  # a transformer family: through its diffusers pipeline
        return base.family.generate(
            base,
            requests,
            bank=bank,
            on_step=on_step,
            dtype=dtype,
            should_cancel=should_cancel,
        )
    for request in requests:
        check_request(base, request)
    results: list[list[GeneratedImage]] = [[] for _ in requests]
    groups: dict[tuple[int, int, int, str], list[int]] = {}
    for index, request in enumerate(requests):
        groups.setdefault(request.loop_key(), []).append(index)
    for indices in groups.values():
        autocast = (
            torch.autocast(base.device.type, dtype=dtype) if dtype is not None else nullcontext()
        )
        with autocast, cancel_checks(base.unet, should_cancel):
            images = _run_loop(base, [requests[i] for i in indices], bank, on_step)
        for i, group_images in zip(indices, images, strict=True):
            results[i] = group_images
    return results


def _slots_for(
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


def _run_loop(
    base: BaseModel,
    requests: Sequence[GenerationRequest],
    bank: ScaleBank | None,
    on_step: Callable[[int, int], None] | None,
) -> list[list[GeneratedImage]]:
    first = requests[0]
    scheduler = SCHEDULERS[first.scheduler](base.scheduler_config)
    scheduler.set_timesteps(first.steps, device=base.device)
    bank, request_slots = _slots_for(base, requests, bank)

    seeds, slots, prompts, negatives, guidance = [], [], [], [], []
    for request, slot in zip(requests, request_slots, strict=True):
        for i in range(request.num_images):
            seeds.append(request.seed + i)
            slots.append(slot)
            prompts.append(request.prompt)
            negatives.append(request.negative_prompt)
            guidance.append(request.guidance_scale)
    shape = (
        base.latent_channels,
        first.height // base.vae_scale_factor,
        first.width // base.vae_scale_factor,
    )
    # One CPU generator per image: the same seed gives the same image in any batch.
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    latents = torch.stack(noise).to(base.device) * scheduler.init_noise_sigma
    conditioning = base.encode(negatives + prompts)
    ids = None
    if base.is_xl:
        if base.zero_empty_negative:
            empty = [n == "" for n in negatives] + [False] * len(prompts)
            conditioning = conditioning.zeroed(torch.tensor(empty))
        size = (first.height, first.width)
        ids = torch.tensor([time_ids(size, (0, 0), size)] * (2 * len(prompts)))
    inputs = base.unet_inputs(conditioning, ids)
    scale = torch.tensor(guidance, device=base.device).view(-1, 1, 1, 1)
    # Routes are worked out on the host (no synchronisation per step), where a batch whose
    # samples share one adapter gets a uniform route, the layers' fast path.
    route_slots, route_timesteps = slots + slots, scheduler.timesteps.tolist()
    unet = base.unet
    for step, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        with routed(unet, bank.route(route_timesteps[step], route_slots)):
            uncond, cond = unet(model_input, t, **inputs).sample.chunk(2)
        prediction = uncond + scale * (cond - uncond)
        latents = scheduler.step(prediction, t, latents).prev_sample
        if on_step is not None:
            on_step(step + 1, len(scheduler.timesteps))
    decoded = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    images = iter(zip(to_pil(decoded.float()), seeds, strict=True))
    return [
        [GeneratedImage(image, seed) for image, seed in (next(images) for _ in range(r.num_images))]
        for r in requests
    ]
