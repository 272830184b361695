"""Sampling: a batch of requests with different adapters equals the requests one by one."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tests.core.helpers import perturbed_adapter
from tuneqdm_core.adapter import AdapterConfig
from tuneqdm_core.base import BaseModel
from tuneqdm_core.generate import GenerationRequest, autocast_dtype, generate


def _pixels(result: list) -> list[np.ndarray]:
    return [np.asarray(g.image, dtype=np.int16) for images in result for g in images]


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++", "euler"])
def test_mixed_adapter_batch_equals_requests_one_by_one(
    tiny_base: BaseModel, scheduler: str
) -> None:
    two = perturbed_adapter(tiny_base.unet, AdapterConfig(intervals=2), spread=0.3)
    peqa = perturbed_adapter(tiny_base.unet, AdapterConfig(method="peqa", intervals=1), spread=0.3)
    common: dict[str, Any] = {"steps": 6, "width": 32, "height": 32, "scheduler": scheduler}
    requests = [
        GenerationRequest("a photo of sks dog", two, num_images=2, seed=1, **common),
        GenerationRequest("a red bag", None, seed=5, guidance_scale=3.0, **common),
        GenerationRequest("a photo of sks cat", peqa, seed=7, negative_prompt="blue", **common),
    ]
    batched = _pixels(generate(tiny_base, requests))
    alone = _pixels([generate(tiny_base, [r])[0] for r in requests])
    # Tolerance: one level of 8-bit rounding (batched matmuls sum in another order).
    assert max(int(np.abs(a - b).max()) for a, b in zip(batched, alone, strict=True)) <= 1
    # ...and the adapter matters: the same seed without it gives another image.
    base_image = _pixels(
        generate(tiny_base, [GenerationRequest("a photo of sks dog", None, seed=1, **common)])
    )
    assert int(np.abs(batched[0] - base_image[0]).max()) > 10


def test_images_have_the_requested_size_and_seeds(tiny_base: BaseModel) -> None:
    request = GenerationRequest("a photo", num_images=3, steps=2, width=48, height=24, seed=40)
    images = generate(tiny_base, [request])[0]
    assert [(g.image.size, g.seed) for g in images] == [
        ((48, 24), 40),
        ((48, 24), 41),
        ((48, 24), 42),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scheduler": "plms"}, "scheduler 'plms' unknown"),
        ({"width": 33}, "multiples of 2"),
        ({"num_images": 0}, "at least 1"),
    ],
)
def test_bad_requests_are_refused(
    tiny_base: BaseModel, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        options: dict[str, Any] = {"steps": 2, "width": 32, "height": 32, **change}
        generate(tiny_base, [GenerationRequest("a photo", **options)])


def test_precision_resolves_per_device() -> None:
    assert autocast_dtype("auto", "cpu") is None  # 16-bit math is slower on a CPU
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("fp16", "cpu") == torch.float16
    assert autocast_dtype("bf16", "cuda:1") == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be"):
        autocast_dtype("int8", "cpu")  # type: ignore[arg-type]


def test_bf16_generation_gives_the_fp32_image_up_to_rounding(tiny_base: BaseModel) -> None:
    adapter = perturbed_adapter(tiny_base.unet, AdapterConfig(intervals=2), spread=0.3)
    request = GenerationRequest("a photo of sks dog", adapter, steps=4, width=32, height=32)
    full = _pixels(generate(tiny_base, [request]))[0]
    half = _pixels(generate(tiny_base, [request], precision="bf16"))[0]
    assert not np.array_equal(full, half)  # it did run in bf16
    assert float(np.abs(full - half).mean()) < 8  # of 255: the same picture
