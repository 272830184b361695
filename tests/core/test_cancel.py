"""Cancel takes effect inside a UNet call: generation, training and class images stop there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import subject_photos
from tuneqdm_core.base import BaseModel
from tuneqdm_core.cancel import Canceled, _blocks
from tuneqdm_core.finetune import FinetuneCanceled, FinetuneConfig, Subject, class_images, finetune
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.sampling import Sampling


class CancelAfter:
    """should_cancel() that turns true at its `n`-th call and counts every call."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


def _hooks(base: BaseModel) -> int:
    return sum(len(block._forward_pre_hooks) for block in _blocks(base.unet))


def test_generation_stops_inside_the_first_unet_call(tiny_base: BaseModel) -> None:
    blocks = len(_blocks(tiny_base.unet))
    assert blocks >= 3
    stop = CancelAfter(2)  # the second block of the first UNet call
    request = GenerationRequest("a photo", steps=50, width=32, height=32)
    with pytest.raises(Canceled):
        generate(tiny_base, [request], should_cancel=stop)
    # Asked once per block and no further: the rest of that call and the other 49 never ran.
    assert stop.calls == 2
    assert _hooks(tiny_base) == 0
    # The base serves the next request as before.
    assert generate(tiny_base, [GenerationRequest("a photo", steps=1, width=32, height=32)])


def test_training_stops_inside_a_unet_call(tiny_base: BaseModel, tmp_path: Path) -> None:
    subject = Subject("a photo of sks dog", subject_photos(2))
    config = FinetuneConfig(steps=100, resolution=32, checkpoint_every=0)
    blocks = len(_blocks(tiny_base.unet))
    # One check before step 1 and one per block of its forward, then the 3rd step's second
    # block: steps 1 and 2 complete, step 3 stops inside its UNet call.
    per_step = 1 + blocks
    stop = CancelAfter(2 * per_step + 3)
    with pytest.raises(FinetuneCanceled) as raised:
        finetune(tiny_base, [subject], config, should_cancel=stop)
    assert raised.value.step == 2
    assert stop.calls == 2 * per_step + 3
    assert _hooks(tiny_base) == 0


def test_class_images_come_in_chunks_with_progress_and_cancel(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []
    made = class_images(
        tiny_base, "a photo of a dog", 6, 32, 2, tmp_path, progress=lambda d, t: seen.append((d, t))
    )
    assert seen == [(0, 6), (4, 6), (6, 6)]
    # Chunking does not change the images: image n has seed n, as in one batch of six.
    whole = class_images(tiny_base, "a photo of a dog", 6, 32, 2, None, chunk=6)
    for path, image in zip(made, whole, strict=True):
        assert isinstance(path, Path)
        a = np.asarray(Image.open(path))
        assert int(np.abs(a.astype(int) - np.asarray(image).astype(int)).max()) <= 1

    # Cancel during the second chunk of a fine-tune's class images: the first chunk stays
    # cached (a resumed job does not make it again) and no training step ran.
    subject = Subject("a photo of sks dog", subject_photos(2), class_prompt="a photo of a cat")
    config = FinetuneConfig(steps=5, resolution=32, num_class_images=12, class_image_steps=2)
    blocks = len(_blocks(tiny_base.unet))
    # Two chunks of 2 sampler steps (one check per block of each UNet call), then the first
    # block of the third chunk.
    stop = CancelAfter(2 * 2 * blocks + 1)
    with pytest.raises(FinetuneCanceled) as raised:
        finetune(tiny_base, [subject], config, cache_dir=tmp_path / "cache", should_cancel=stop)
    assert raised.value.step == 0
    cached = list((tmp_path / "cache").glob("class-*/*.png"))
    assert len(cached) == 8
    assert not list((tmp_path / "cache").glob("class-*/.*"))


def test_a_cancel_while_progress_images_are_made_stops_within_one_unet_call(
    tiny_base: BaseModel,
) -> None:
    subject = Subject("a photo of sks dog", subject_photos(2))
    config = FinetuneConfig(steps=5, resolution=32, checkpoint_every=0)
    sampling = Sampling(["a photo of sks dog"], every=1, size=32, steps=50, precision="auto")
    denoised: list[int] = []
    made: list[int] = []

    def sample_step(done: int, total: int) -> None:
        denoised.append(done)  # the first denoising step of step 1's images is done

    def canceled() -> bool:
        return bool(denoised)

    with pytest.raises(FinetuneCanceled) as raised:
        finetune(
            tiny_base,
            [subject],
            config,
            should_cancel=canceled,
            sampling=sampling,
            on_sample=lambda step, images, adapter: made.append(step),
            on_sample_step=sample_step,
        )
    # Step 1 trained, its images stopped inside the UNet call after their first step: no
    # images handed over, 49 denoising steps never ran, no hook left behind.
    assert raised.value.step == 1
    assert denoised == [1] and made == []
    assert _hooks(tiny_base) == 0
