"""What fine-tuning samples from, computed once before the first step: the subjects' photos and
the base's own class images (prior preservation) as VAE posteriors, and the prompts' text
conditioning (SDXL: with pooled embeddings and time ids)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuneqdm_core.base import BaseModel, Conditioning, time_ids
from tuneqdm_core.finetune_config import FinetuneConfig
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.images import (
    ImageSource,
    load_subject_images,
    open_image,
    to_training_tensor,
    training_crop,
)


@dataclass(frozen=True)
class Subject:
    """One subject: its photos and the prompt with its identifier ("a photo of sks dog").
    ``class_prompt`` ("a photo of a dog") turns on prior preservation for it."""

    instance_prompt: str
    images: Sequence[ImageSource]
    class_prompt: str | None = None


@dataclass
class TrainingData:
    """Everything the loop samples from, computed once."""

    mean: torch.Tensor  # [N, C, h, w] latent means (instance images, then class images)
    std: torch.Tensor
    embeds: torch.Tensor  # [P, 77, D] one per distinct prompt
    prompt_of: torch.Tensor  # [N] index into embeds
    instance: int  # the first `instance` rows are subject images
    subject_of: torch.Tensor  # [instance] subject index of each instance image
    class_rows: list[list[int]]  # per subject, rows of its class images (may be empty)
    # SDXL only: the pooled text embedding per prompt [P, E] and the time ids per row [N, 6].
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


def unet_inputs(base: BaseModel, data: TrainingData, rows: torch.Tensor) -> dict[str, Any]:
    """The UNet's conditioning keyword arguments for data ``rows`` (base.unet_inputs)."""
    prompts = data.prompt_of[rows]
    if data.time_ids is None:
        return {"encoder_hidden_states": data.embeds[prompts]}
    return base.unet_inputs(Conditioning(data.embeds, data.pooled)[prompts], data.time_ids[rows])


@torch.no_grad()
def _encode_images(base: BaseModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(8):
        dist = base.vae.encode(chunk.to(base.device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# Class images per generate() call: progress, cancel checks and the cache advance per chunk
# instead of once after up to 1000 images.
CLASS_IMAGE_CHUNK = 4


def class_images(
    base: BaseModel,
    prompt: str,
    count: int,
    resolution: int,
    steps: int,
    cache_dir: Path | None,
    *,
    should_cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = CLASS_IMAGE_CHUNK,
) -> list[ImageSource]:
    """``count`` images of ``prompt`` from the base model itself, cached per base and prompt.

    Made ``chunk`` at a time; each chunk is saved before the next starts, so a canceled or
    interrupted job keeps what it made. Image ``n`` always has seed ``n``, so chunking does not
    change the images. ``progress(done, count)`` is called after each chunk; ``should_cancel``
    as in :func:`~tuneqdm_core.generate.generate` (raises
    :class:`~tuneqdm_core.cancel.Canceled`)."""
    key = hashlib.sha256(f"{base.fingerprint}|{prompt}|{resolution}|{steps}".encode()).hexdigest()
    folder = cache_dir / f"class-{key[:16]}" if cache_dir else None
    have: list[ImageSource] = [*sorted(folder.glob("*.png"))] if folder and folder.is_dir() else []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    while len(have) < count:
        if progress is not None:
            progress(len(have), count)
        request = GenerationRequest(
            prompt=prompt,
            num_images=min(chunk, count - len(have)),
            steps=steps,
            width=resolution,
            height=resolution,
            seed=len(have),
        )
        made = [g.image for g in generate(base, [request], should_cancel=should_cancel)[0]]
        if folder is None:
            have += made
            continue
        for image in made:
            # Written under a temporary name and renamed: a killed worker leaves no half PNG.
            path = folder / f"{len(have):05d}.png"
            tmp = folder / f".{path.name}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            have.append(path)
    if progress is not None:
        progress(min(len(have), count), count)
    return have[:count]


def prepare_data(
    base: BaseModel,
    subjects: Sequence[Subject],
    config: FinetuneConfig,
    cache_dir: Path | None,
    should_cancel: Callable[[], bool] | None = None,
    on_class_images: Callable[[int, int], None] | None = None,
) -> TrainingData:
    prompts: list[str] = []

    def prompt_index(prompt: str) -> int:
        if prompt not in prompts:
            prompts.append(prompt)
        return prompts.index(prompt)

    pixels, prompt_of, subject_of = [], [], []
    # SDXL's time ids per row: each photo's original size and where its crop lies.
    res = config.resolution
    ids: list[list[int]] = []
    for s, subject in enumerate(subjects):
        images = load_subject_images(subject.images, res)
        pixels.append(images)
        prompt_of += [prompt_index(subject.instance_prompt)] * len(images)
        subject_of += [s] * len(images)
        if base.is_xl:
            for source in subject.images:
                width, height = open_image(source).size
                _, left, top = training_crop((width, height), res)
                ids.append(time_ids((height, width), (top, left), (res, res)))
    instance = len(prompt_of)
    class_rows: list[list[int]] = []
    for subject in subjects:
        rows: list[int] = []
        if subject.class_prompt and config.num_class_images:
            sources = class_images(
                base,
                subject.class_prompt,
                config.num_class_images,
                config.resolution,
                config.class_image_steps,
                cache_dir,
                should_cancel=should_cancel,
                progress=on_class_images,
            )
            tensors = [to_training_tensor(open_image(src), config.resolution) for src in sources]
            start = sum(p.shape[0] for p in pixels)
            pixels.append(torch.stack(tensors))
            rows = list(range(start, start + len(tensors)))
            prompt_of += [prompt_index(subject.class_prompt)] * len(tensors)
            # Made by the base at the training size: nothing cropped.
            ids += [time_ids((res, res), (0, 0), (res, res))] * len(tensors)
        class_rows.append(rows)
    mean, std = _encode_images(base, torch.cat(pixels))
    conditioning = base.encode(prompts)
    return TrainingData(
        mean=mean,
        std=std,
        embeds=conditioning.states,
        prompt_of=torch.tensor(prompt_of),
        instance=instance,
        subject_of=torch.tensor(subject_of),
        class_rows=class_rows,
        pooled=conditioning.pooled,
        time_ids=torch.tensor(ids, dtype=torch.float32) if base.is_xl else None,
    )
