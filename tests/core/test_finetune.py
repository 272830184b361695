"""Fine-tuning on the built-in tiny model: it learns, resumes exactly, and handles the batch
shapes the paper's code does not (batch > 1, prior preservation, several subjects)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import subject_photos
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.builtin.tiny import save_tiny_pipeline
from tuneqdm_core.finetune import (
    FinetuneCanceled,
    FinetuneConfig,
    Progress,
    Subject,
    finetune,
    loss_trend,
)
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.model import quant_state
from tuneqdm_core.serialization import adapter_tensors

# Learning rates for a random tiny model whose quantization steps are ~1e-2 (not SD's ~1e-3).
FAST: dict[str, Any] = {"resolution": 32, "lr_s_out": 1e-3, "lr_s_in": 3e-2}


def test_loss_falls_over_a_short_finetune(tiny_base: BaseModel) -> None:
    seen: list[Progress] = []
    config = FinetuneConfig(steps=40, batch_size=2, **FAST)
    result = finetune(
        tiny_base, [Subject("a photo of sks dog", subject_photos())], config, progress=seen.append
    )
    first, last = loss_trend(result.losses)
    assert last < 0.8 * first, (first, last)
    assert [p.step for p in seen] == list(range(1, 41))
    assert seen[-1].eta == 0 and seen[-1].elapsed > 0
    assert quant_state(tiny_base.unet).route is None  # the shared base is left clean


@pytest.mark.slow
def test_resume_from_checkpoint_gives_the_same_adapter(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    subjects = [
        Subject("a photo of sks dog", subject_photos(), class_prompt="a photo of a dog"),
        Subject("a photo of zwx cat", subject_photos(2, size=(30, 30))),
    ]
    config = FinetuneConfig(
        steps=6,
        batch_size=2,
        checkpoint_every=2,
        num_class_images=3,
        class_image_steps=2,
        **FAST,
    )
    cache = tmp_path / "cache"
    straight = finetune(tiny_base, subjects, config, cache_dir=cache)
    # Cancel once step 3 is done (the check also runs inside every UNet call, so count steps,
    # not calls).
    done: list[int] = []
    with pytest.raises(FinetuneCanceled, match="after step 3"):
        finetune(
            tiny_base,
            subjects,
            config,
            checkpoint_dir=tmp_path,
            cache_dir=cache,
            progress=lambda p: done.append(p.step),
            should_cancel=lambda: len(done) >= 3,
        )
    resumed = finetune(tiny_base, subjects, config, checkpoint_dir=tmp_path, cache_dir=cache)
    assert resumed.resumed_from == 2  # the last checkpoint before the cancel
    assert straight.adapter is not None and resumed.adapter is not None
    for a, b in zip(straight.adapter.parameters(), resumed.adapter.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.losses == straight.losses
    other = FinetuneConfig(steps=6, batch_size=1, checkpoint_every=2, **FAST)
    with pytest.raises(ValueError, match="another configuration"):
        finetune(tiny_base, subjects, other, checkpoint_dir=tmp_path, cache_dir=cache)


def test_class_images_are_generated_once_and_cached(tiny_base: BaseModel, tmp_path: Path) -> None:
    subject = Subject("a photo of sks dog", subject_photos(), class_prompt="a photo of a dog")
    config = FinetuneConfig(steps=1, num_class_images=2, class_image_steps=2, **FAST)
    finetune(tiny_base, [subject], config, cache_dir=tmp_path)
    made = sorted(tmp_path.rglob("*.png"))
    assert len(made) == 2
    stamps = [p.stat().st_mtime_ns for p in made]
    finetune(tiny_base, [subject], config, cache_dir=tmp_path)
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("*.png"))] == stamps


def test_peqa_trains_s_out_only(tiny_base: BaseModel) -> None:
    config = FinetuneConfig(method="peqa", intervals=4, steps=2, **FAST)
    result = finetune(tiny_base, [Subject("a photo of sks dog", subject_photos())], config)
    assert result.adapter is not None and not result.adapter.has_s_in
    assert result.adapter.config.intervals == 1
    assert all(".s_out." in key for key in adapter_tensors(result.adapter))


def test_full_finetune_trains_the_float_unet(tiny_base: BaseModel) -> None:
    config = FinetuneConfig(method="full", steps=2, resolution=32, lr=1e-3)
    result = finetune(tiny_base, [Subject("a photo of sks dog", subject_photos())], config)
    assert result.adapter is None and result.unet is not None
    assert not any(name.endswith("codes") for name, _ in result.unet.named_buffers())


def test_gradient_checkpointing_trains_the_same(tiny_base: BaseModel) -> None:
    subjects = [Subject("a photo of sks dog", subject_photos())]
    plain = finetune(tiny_base, subjects, FinetuneConfig(steps=3, batch_size=2, **FAST))
    ckpt = finetune(
        tiny_base,
        subjects,
        FinetuneConfig(steps=3, batch_size=2, gradient_checkpointing=True, **FAST),
    )
    assert plain.adapter is not None and ckpt.adapter is not None
    for a, b in zip(plain.adapter.parameters(), ckpt.adapter.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_sd2_shaped_model_trains_with_v_prediction(tmp_path: Path) -> None:
    folder = save_tiny_pipeline(tmp_path / "sd2", arch="tiny-sd2")
    base = load_base(folder)
    assert base.scheduler_config["prediction_type"] == "v_prediction"
    assert base.unet.config.use_linear_projection
    config = FinetuneConfig(steps=3, batch_size=2, **FAST)
    result = finetune(base, [Subject("a photo of sks dog", subject_photos())], config)
    assert all(math.isfinite(loss) for loss in result.losses)
    request = GenerationRequest("a photo of sks dog", result.adapter, steps=3, width=32, height=32)
    assert generate(base, [request])[0][0].image.size == (32, 32)
