"""The benchmarks' baselines on a transformer base: LoRA on the quantized base
(``method="lora"``) and the float transformer itself (``method="full"``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from tests.conftest import subject_photos
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.cli import main
from tuneqdm_core.cotrain import CoTrainer
from tuneqdm_core.finetune import FinetuneConfig, Subject, finetune
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.layers import QuantLinear
from tuneqdm_core.lora import LoRA

DOG = Subject("a photo of sks dog", subject_photos())
SIZE: dict[str, Any] = {"width": 32, "height": 32}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> BaseModel:
    folder = tmp_path_factory.mktemp("lora") / "model"
    assert main(["build-tiny", "--arch", "tiny-flux", str(folder)]) == 0
    return load_base(folder)


def _draw(base: BaseModel) -> np.ndarray:
    request = GenerationRequest("a photo of sks dog", steps=2, seed=3, guidance_scale=1.0, **SIZE)
    return np.asarray(generate(base, [request])[0][0].image, dtype=np.int16)


def test_a_layers_update_is_the_low_rank_product(base: BaseModel) -> None:
    lora = LoRA(base.unet, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for up in lora.up:
            up.normal_(0, 0.1)
    name = lora.names[0]
    layer = dict(base.unet.named_modules())[name]
    assert isinstance(layer, QuantLinear)
    x = torch.randn(3, layer.in_features)
    down, up = lora.down[0], lora.up[0]
    with torch.no_grad():
        plain = layer(x)
        with lora.applied(base.unet):
            adapted = layer(x)
    torch.testing.assert_close(adapted, plain + x @ down.T @ up.T)
    # Outside the block the shared base is itself again.
    with torch.no_grad():
        torch.testing.assert_close(layer(x), plain)
    assert len(lora.names) == sum(isinstance(m, QuantLinear) for m in base.unet.modules())


def test_lora_trains_on_the_quantized_base_and_leaves_it_alone(base: BaseModel) -> None:
    before = _draw(base)
    config = FinetuneConfig(method="lora", steps=4, resolution=32, lora_rank=4, lr_lora=1e-2)
    result = finetune(base, [DOG], config)
    assert result.adapter is None and result.lora is not None
    assert any(float(up.abs().max()) > 0 for up in result.lora.up)
    assert not any(p.requires_grad for p in result.lora.parameters())
    assert np.array_equal(_draw(base), before)
    with result.lora.applied(base.unet):
        assert int(np.abs(_draw(base) - before).max()) > 0
    assert not CoTrainer(base).accepts(config)


def test_full_fine_tunes_the_float_transformer(base: BaseModel) -> None:
    result = finetune(base, [DOG], FinetuneConfig(method="full", steps=2, resolution=32, lr=1e-3))
    assert isinstance(result.unet, FluxTransformer2DModel)
    original = base.family.load_float(base.source)
    changed = [
        name
        for (name, p), q in zip(result.unet.named_parameters(), original.parameters(), strict=True)
        if not torch.equal(p.detach(), q)
    ]
    assert changed and result.adapter is None


def test_the_cli_writes_a_lora_diffusers_loads(base: BaseModel, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(subject_photos(2)):
        photo.save(photos / f"{i}.png")
    out = tmp_path / "lora.safetensors"
    args = ["finetune", base.source, "--images", str(photos), "--prompt", "a photo of sks dog"]
    args += ["--method", "lora", "--lora-rank", "4", "--lr-lora", "1e-2", "--steps", "2"]
    assert main([*args, "--resolution", "32", "--out", str(out)]) == 0
    pipeline = FluxPipeline.from_pretrained(base.source, local_files_only=True)
    pipeline.load_lora_weights(str(out))
    adapted = {name for name, m in pipeline.transformer.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(LoRA(base.unet, 1, torch.Generator()).names)


def test_lora_refuses_a_rank_below_one(base: BaseModel) -> None:
    with pytest.raises(ValueError, match="rank"):
        LoRA(base.unet, 0, torch.Generator())
