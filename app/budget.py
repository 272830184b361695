"""Compute budgets checked at submit: a request whose work is above its limit is refused
before anything is stored, with a message naming the limit, its setting and what to lower.

Costs are counted in units of one UNet sample at the base's native size, so a limit means the
same amount of work on every base: a fine-tune costs steps × batch × (1 + prior) × pixels /
native pixels (prior preservation doubles each step's batch) plus its progress images
((sampling points + step 0) × validation prompts × TUNEQDM_SAMPLE_STEPS, at the native
size), a generation images × steps × pixels / native pixels (twice that with compare_base,
which makes the base's images too). Attention makes large sizes cost more than their pixel
count, which is one reason sizes are also bounded (TUNEQDM_MAX_SIZE_FACTOR).
The class images of prior preservation are not in the budget; the job's time limit bounds
them.
"""

from __future__ import annotations

from app.errors import InvalidInput
from app.schemas import FinetuneParams, sample_points
from app.settings import Settings


def _area(width: int, height: int, native: int) -> float:
    return width * height / (native * native)


def training_cost(params: FinetuneParams, *, prior: bool, native: int) -> float:
    assert params.resolution is not None, "resolve the resolution first"
    return (
        params.steps
        * params.batch_size
        * (2 if prior else 1)
        * _area(params.resolution, params.resolution, native)
    )


def sampling_cost(params: FinetuneParams, *, sample_steps: int) -> float:
    """The progress images: one per validation prompt at each sampling point and at step 0,
    native size."""
    if not params.validation_prompts or params.sample_every is None:
        return 0.0
    # One more point than sample_points counts: step 0, the base before any training.
    points = sample_points(params.steps, params.sample_every) + 1
    return float(points * len(params.validation_prompts) * sample_steps)


def generation_cost(*, num_images: int, steps: int, width: int, height: int, native: int) -> float:
    return num_images * steps * _area(width, height, native)


def check_finetune(params: FinetuneParams, *, prior: bool, native: int, settings: Settings) -> None:
    sampling = sampling_cost(params, sample_steps=settings.sample_steps)
    cost = training_cost(params, prior=prior, native=native) + sampling
    limit = settings.max_finetune_cost
    if cost > limit:
        res = params.resolution
        samples = (
            f" + {sampling:g} for progress images ((sampling points + step 0) × "
            f"validation_prompts × TUNEQDM_SAMPLE_STEPS {settings.sample_steps})"
            if sampling
            else ""
        )
        raise InvalidInput(
            f"this fine-tune costs {cost:g} (steps {params.steps} × batch_size "
            f"{params.batch_size}{' × 2 for prior preservation' if prior else ''} × "
            f"{res}² / {native}² pixels{samples}), above the limit of {limit:g} "
            f"(TUNEQDM_MAX_FINETUNE_COST); lower steps, batch_size or resolution"
            f"{', or sample less often (sample_every)' if sampling else ''}"
        )


def check_generation(
    *,
    num_images: int,
    steps: int,
    width: int,
    height: int,
    native: int,
    settings: Settings,
    compare_base: bool = False,
) -> None:
    """With compare_base each image is made twice (adapter and base): twice the cost."""
    sides = 2 if compare_base else 1
    cost = generation_cost(
        num_images=num_images * sides, steps=steps, width=width, height=height, native=native
    )
    limit = settings.max_generation_cost
    if cost > limit:
        doubled = " × 2 for compare_base" if compare_base else ""
        raise InvalidInput(
            f"this generation costs {cost:g} (num_images {num_images}{doubled} × steps {steps} × "
            f"{width}×{height} / {native}² pixels), above the limit of {limit:g} "
            f"(TUNEQDM_MAX_GENERATION_COST); lower num_images, steps, width or height"
        )
