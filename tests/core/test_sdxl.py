"""SDXL end to end on the tiny SDXL-layout pipeline: loading, conditioning as diffusers' SDXL
pipeline computes it, fine-tuning (exact against the oracle in float64, exact resume, prior
preservation, co-training), and generation (deterministic, mixed-adapter batches)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from safetensors.torch import save_file

from tests.conftest import subject_photos
from tests.core.helpers import assert_close_all, perturbed_adapter, run_both
from tuneqdm_core.adapter import AdapterConfig
from tuneqdm_core.base import BaseModel, _checkpoint_is_xl, load_base
from tuneqdm_core.cli import main
from tuneqdm_core.cotrain import CoJob, cotrain
from tuneqdm_core.finetune import (
    FinetuneCanceled,
    FinetuneConfig,
    Subject,
    finetune,
    loss_trend,
)
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.ldm_layout import xl_pipeline_to_ldm
from tuneqdm_core.model import quant_state
from tuneqdm_core.training_data import prepare_data, unet_inputs
from tuneqdm_core.training_step import draw_batch, noisy_latents

# As in test_finetune.py: rates for a random tiny model whose quantization steps are ~1e-2.
FAST: dict[str, Any] = {"resolution": 32, "lr_s_out": 1e-3, "lr_s_in": 3e-2}
DOG = Subject("a photo of sks dog", subject_photos(), class_prompt="a photo of a dog")
# Photos of another aspect ratio: their crop corner and original size enter the time ids.
CAT = Subject("a photo of zwx cat", subject_photos(2, size=(30, 44)))


@pytest.fixture(scope="module")
def xl_base(tiny_xl_dir: Path, quant_cache: Path) -> BaseModel:
    return load_base(tiny_xl_dir, cache_dir=quant_cache)


@pytest.fixture(scope="module")
def xl_base64(tiny_xl_dir: Path, quant_cache: Path) -> BaseModel:
    """The tiny SDXL base in float64 (its own copy)."""
    base = load_base(tiny_xl_dir, cache_dir=quant_cache)
    for model in (base.unet, base.vae, *base.text_encoders):
        model.double()
    base.vae.encoder.register_forward_pre_hook(lambda _m, args: (args[0].double(), *args[1:]))
    return base


def _pixels(result: list) -> list[np.ndarray]:
    return [np.asarray(g.image, dtype=np.int16) for images in result for g in images]


def test_sdxl_folder_loads_with_both_text_encoders(
    tiny_xl_dir: Path, xl_base: BaseModel, quant_cache: Path
) -> None:
    index = json.loads((tiny_xl_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    for part in ("text_encoder_2", "tokenizer_2"):
        assert (tiny_xl_dir / part).is_dir()
    assert xl_base.is_xl and xl_base.zero_empty_negative
    assert xl_base.text_encoder_2 is not None and xl_base.tokenizer_2 is not None
    assert quant_state(xl_base.unet).layers  # the UNet is quantized
    # From the quantized cache: the same model, with both encoders again.
    again = load_base(tiny_xl_dir, cache_dir=quant_cache)
    assert again.from_cache and again.is_xl and again.fingerprint == xl_base.fingerprint
    prompts = ["a photo of sks dog"]
    assert torch.equal(again.encode(prompts).pooled, xl_base.encode(prompts).pooled)  # type: ignore[arg-type]


def test_conditioning_is_what_the_diffusers_sdxl_pipeline_computes(
    tiny_xl_dir: Path, xl_base: BaseModel
) -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
    prompts = ["a photo of sks dog", "a red shoe on the beach"]
    states, _, pooled, _ = pipeline.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=False
    )
    ours = xl_base.encode(prompts)
    assert ours.pooled is not None
    assert ours.states.shape == (2, 77, xl_base.unet.config.cross_attention_dim)
    assert torch.equal(ours.states, states) and torch.equal(ours.pooled, pooled)


@pytest.mark.parametrize("negative", ["", "blue"])
def test_generation_matches_the_diffusers_sdxl_pipeline(
    tiny_xl_dir: Path, xl_base: BaseModel, negative: str
) -> None:
    """The same quantized UNet, noise and scheduler: our loop (time ids, pooled text, the
    empty negative prompt as zeros, guidance) gives diffusers' SDXL pipeline's image."""
    request = GenerationRequest(
        "a photo of sks dog", negative_prompt=negative, steps=4, width=32, height=32,
        seed=3, scheduler="euler", guidance_scale=5.0,
    )  # fmt: skip
    ours = _pixels(generate(xl_base, [request]))[0]
    float_pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)
    pipeline = StableDiffusionXLPipeline(
        **{**float_pipeline.components, "unet": xl_base.unet}, add_watermarker=False
    )
    shape = (1, 4, 16, 16)
    latents = torch.randn(shape[1:], generator=torch.Generator().manual_seed(3))[None]
    theirs = pipeline(
        request.prompt,
        negative_prompt=negative or None,
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        latents=latents,
        output_type="pil",
    ).images[0]
    assert int(np.abs(ours - np.asarray(theirs, dtype=np.int16)).max()) <= 1


def test_mixed_adapter_batch_equals_requests_one_by_one(xl_base: BaseModel) -> None:
    two = perturbed_adapter(xl_base.unet, AdapterConfig(intervals=2), spread=0.3)
    peqa = perturbed_adapter(xl_base.unet, AdapterConfig(method="peqa", intervals=1), spread=0.3)
    common: dict[str, Any] = {"steps": 4, "width": 32, "height": 32}
    requests = [
        GenerationRequest("a photo of sks dog", two, num_images=2, seed=1, **common),
        GenerationRequest("a red bag", None, seed=5, guidance_scale=3.0, **common),
        GenerationRequest("a photo of sks cat", peqa, seed=7, negative_prompt="blue", **common),
    ]
    batched = _pixels(generate(xl_base, requests))
    alone = _pixels([generate(xl_base, [r])[0] for r in requests])
    assert max(int(np.abs(a - b).max()) for a, b in zip(batched, alone, strict=True)) <= 1
    # Deterministic, and the adapter matters.
    assert all(
        np.array_equal(a, b)
        for a, b in zip(batched, _pixels(generate(xl_base, requests)), strict=True)
    )
    plain = GenerationRequest("a photo of sks dog", None, seed=1, **common)
    assert int(np.abs(batched[0] - _pixels(generate(xl_base, [plain]))[0]).max()) > 10


def test_finetune_lowers_the_loss(xl_base: BaseModel) -> None:
    result = finetune(
        xl_base, [DOG], FinetuneConfig(steps=30, batch_size=2, num_class_images=0, **FAST)
    )
    first, last = loss_trend(result.losses)
    assert last < 0.8 * first, (first, last)
    assert quant_state(xl_base.unet).route is None


def test_time_ids_carry_each_photos_size_and_crop(xl_base: BaseModel) -> None:
    data = prepare_data(xl_base, [CAT], FinetuneConfig(steps=1, **FAST), None)
    assert data.time_ids is not None and data.pooled is not None
    # 30×44 (w×h) photo → 32×47 after resizing the short side, cropped 32×32 from row 7.
    assert data.time_ids.tolist() == [[44.0, 30.0, 7.0, 0.0, 32.0, 32.0]] * 2


def test_a_training_step_matches_the_oracle_in_float64(xl_base64: BaseModel) -> None:
    """The step's forward and scale gradients with SDXL's real conditioning equal the
    materialising oracle's (tests/core/oracle.py), batch of two subjects' photos."""
    config = FinetuneConfig(steps=1, batch_size=3, num_class_images=0, **FAST)
    data = prepare_data(xl_base64, [DOG, CAT], config, None)
    scheduler = DDPMScheduler.from_config(xl_base64.scheduler_config)
    batch = draw_batch(data, config, torch.Generator().manual_seed(0), 1000)
    noisy, t, _ = noisy_latents(xl_base64, data, batch, scheduler)
    inputs = unet_inputs(xl_base64, data, batch.rows)
    assert inputs["added_cond_kwargs"]["time_ids"].dtype == torch.float64
    adapter = perturbed_adapter(xl_base64.unet, AdapterConfig(intervals=2))
    adapter.requires_grad_(True)
    unet = xl_base64.unet

    def call() -> torch.Tensor:
        return unet(noisy, t, **inputs).sample

    (y, g), (y_ref, g_ref) = run_both(unet, call, [adapter], t.tolist(), [0] * t.shape[0])
    assert_close_all([y], [y_ref], rtol=1e-12)
    assert_close_all(g, g_ref, rtol=1e-10)


def test_resume_and_prior_preservation_give_the_same_adapter(
    xl_base: BaseModel, tmp_path: Path
) -> None:
    config = FinetuneConfig(
        steps=4, batch_size=2, checkpoint_every=2, num_class_images=2, class_image_steps=2, **FAST
    )
    cache = tmp_path / "cache"
    straight = finetune(xl_base, [DOG, CAT], config, cache_dir=cache)
    assert len(list(cache.rglob("*.png"))) == 2  # the dog's class images, made by the base
    done: list[int] = []
    with pytest.raises(FinetuneCanceled, match="after step 3"):
        finetune(
            xl_base,
            [DOG, CAT],
            config,
            checkpoint_dir=tmp_path,
            cache_dir=cache,
            progress=lambda p: done.append(p.step),
            should_cancel=lambda: len(done) >= 3,
        )
    resumed = finetune(xl_base, [DOG, CAT], config, checkpoint_dir=tmp_path, cache_dir=cache)
    assert resumed.resumed_from == 2
    assert straight.adapter is not None and resumed.adapter is not None
    for a, b in zip(straight.adapter.parameters(), resumed.adapter.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed.losses == straight.losses


def test_cotrained_jobs_end_as_they_would_alone(xl_base64: BaseModel) -> None:
    dog = FinetuneConfig(steps=2, seed=1, num_class_images=0, **FAST)
    cat = FinetuneConfig(steps=3, intervals=2, seed=2, **FAST)
    solo = {"dog": finetune(xl_base64, [DOG], dog), "cat": finetune(xl_base64, [CAT], cat)}
    grouped = cotrain(xl_base64, [CoJob("dog", [DOG], dog), CoJob("cat", [CAT], cat)])
    for key, alone in solo.items():
        result = grouped[key].result
        assert result is not None and result.adapter is not None and alone.adapter is not None
        got: list[torch.Tensor | None] = list(result.adapter.parameters())
        want: list[torch.Tensor | None] = list(alone.adapter.parameters())
        assert_close_all(got, want, rtol=1e-10)


def test_cli_builds_and_samples_the_tiny_sdxl_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, out = str(tmp_path / "tiny-xl"), tmp_path / "out"
    assert main(["build-tiny", "--xl", model]) == 0
    assert (tmp_path / "tiny-xl" / "text_encoder_2").is_dir()
    size = ["--width", "32", "--height", "32", "--steps", "2"]
    args = ["generate", model, "--prompt", "a photo of a dog", *size, "--out", str(out)]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert len(list(out.glob("*.png"))) == 1


def test_single_sdxl_file_loads_like_its_folder(
    tiny_xl_dir: Path, xl_base: BaseModel, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "xl.safetensors"
    save_file(
        xl_pipeline_to_ldm(StableDiffusionXLPipeline.from_pretrained(tiny_xl_dir)), checkpoint
    )
    # Without a config folder, the file's own keys say SDXL (the configs then come from the hub).
    assert _checkpoint_is_xl(str(checkpoint))
    single = load_base(checkpoint, config=tiny_xl_dir)
    assert single.is_xl and single.zero_empty_negative
    assert single.fingerprint == xl_base.fingerprint
    prompts = ["a photo of sks dog", "a red shoe"]
    a, b = single.encode(prompts), xl_base.encode(prompts)
    assert a.pooled is not None and b.pooled is not None
    assert torch.equal(a.states, b.states) and torch.equal(a.pooled, b.pooled)
