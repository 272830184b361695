"""FLUX models guided classifier-free (``model_index.json``'s ``_guidance: "cfg"``, as the
built-in models/fashion-flux): what the base says it is, and that its generation is
FluxPipeline's true CFG called directly, adapters routed in both passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from tests.core.helpers import perturbed_adapter
from tuneqdm_core.adapter import AdapterConfig
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.builtin.pretrain_flux import mark_model
from tuneqdm_core.cli import main
from tuneqdm_core.families.flux import TRAIN_GUIDANCE, guidance_of
from tuneqdm_core.generate import GenerationRequest, generate

SIZE: dict[str, Any] = {"width": 32, "height": 32}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny FLUX folder as built (a guidance embedding) and a copy marked for CFG."""
    root = tmp_path_factory.mktemp("flux-guidance")
    assert main(["build-tiny", "--arch", "tiny-flux", str(root / "embedded")]) == 0
    assert main(["build-tiny", "--arch", "tiny-flux", str(root / "cfg")]) == 0
    mark_model(root / "cfg")
    return root / "embedded", root / "cfg"


@pytest.fixture(scope="module")
def cfg_base(folders: tuple[Path, Path]) -> BaseModel:
    return load_base(folders[1])


def _pixels(result: list) -> list[np.ndarray]:
    return [np.asarray(g.image, dtype=np.int16) for images in result for g in images]


def test_the_index_says_how_a_flux_model_is_guided(
    folders: tuple[Path, Path], cfg_base: BaseModel
) -> None:
    assert load_base(folders[0]).guidance == "embedded"
    assert cfg_base.guidance == "cfg"
    assert guidance_of({}, {"guidance_embeds": False}) == "none"
    # The marked folder still loads in plain diffusers (the key starts with "_").
    assert type(FluxPipeline.from_pretrained(folders[1], local_files_only=True)) is FluxPipeline


def test_cfg_generation_is_fluxpipelines_true_cfg(
    folders: tuple[Path, Path], cfg_base: BaseModel
) -> None:
    request = GenerationRequest(
        "a photo of sks dog", steps=3, seed=4, guidance_scale=4.0, negative_prompt="blue", **SIZE
    )
    ours = _pixels(generate(cfg_base, [request]))[0]
    float_pipeline = FluxPipeline.from_pretrained(folders[1], local_files_only=True)
    pipeline = FluxPipeline(**{**float_pipeline.components, "transformer": cfg_base.unet})
    theirs = pipeline(
        request.prompt,
        negative_prompt=request.negative_prompt,
        true_cfg_scale=request.guidance_scale,
        guidance_scale=TRAIN_GUIDANCE,
        num_inference_steps=request.steps,
        generator=[torch.Generator().manual_seed(request.seed)],
        output_type="pil",
        **SIZE,
    ).images[0]
    assert int(np.abs(ours - np.asarray(theirs, dtype=np.int16)).max()) <= 1
    # The unconditioned pass matters: scale 1 (no second pass) draws something else.
    plain = GenerationRequest("a photo of sks dog", steps=3, seed=4, guidance_scale=1.0, **SIZE)
    assert int(np.abs(ours - _pixels(generate(cfg_base, [plain]))[0]).max()) > 10


def test_cfg_batches_of_adapters_equal_requests_one_by_one(cfg_base: BaseModel) -> None:
    adapter = perturbed_adapter(cfg_base.unet, AdapterConfig(intervals=2), spread=0.3)
    common: dict[str, Any] = {"steps": 3, "guidance_scale": 3.0, **SIZE}
    requests = [
        GenerationRequest("a photo of sks dog", adapter, num_images=2, seed=1, **common),
        GenerationRequest("a red bag", None, seed=5, negative_prompt="blue", **common),
    ]
    batched = _pixels(generate(cfg_base, requests))
    alone = _pixels([generate(cfg_base, [r])[0] for r in requests])
    assert max(int(np.abs(a - b).max()) for a, b in zip(batched, alone, strict=True)) <= 1


def test_a_model_with_an_embedding_refuses_negative_prompts(folders: tuple[Path, Path]) -> None:
    base = load_base(folders[0])
    request = GenerationRequest("a photo of sks dog", steps=2, negative_prompt="blue", **SIZE)
    with pytest.raises(ValueError, match="no negative prompt"):
        generate(base, [request])
