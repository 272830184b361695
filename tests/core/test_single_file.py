"""A single ``.safetensors`` / ``.ckpt`` checkpoint loads through diffusers' from_single_file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.configs import example_inputs
from tuneqdm_core.ldm_layout import pipeline_to_ldm


def _same_model(a: BaseModel, b: BaseModel) -> None:
    assert a.fingerprint == b.fingerprint
    inputs = example_inputs(a.unet, 2, torch.tensor([3, 700]))
    with torch.no_grad():
        assert torch.equal(a.unet(**inputs).sample, b.unet(**inputs).sample)
        prompts = ["a photo of sks dog", "a red shoe"]
        assert torch.equal(a.encode_prompts(prompts), b.encode_prompts(prompts))
        latents = torch.randn(1, a.latent_channels, 16, 16)
        assert torch.equal(a.vae.decode(latents).sample, b.vae.decode(latents).sample)
    assert a.scheduler_config["_class_name"] == b.scheduler_config["_class_name"]
    assert a.scheduler_config["beta_schedule"] == b.scheduler_config["beta_schedule"]


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_like_its_folder(
    tiny_model_dir: Path, tiny_base: BaseModel, tmp_path: Path, suffix: str
) -> None:
    state = pipeline_to_ldm(StableDiffusionPipeline.from_pretrained(tiny_model_dir))
    checkpoint = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, checkpoint)
    else:
        torch.save({"state_dict": state}, checkpoint)
    cache = tmp_path / "cache"
    first = load_base(checkpoint, config=tiny_model_dir, cache_dir=cache)
    assert not first.from_cache
    _same_model(first, tiny_base)
    again = load_base(checkpoint, config=tiny_model_dir, cache_dir=cache)
    assert again.from_cache
    _same_model(again, tiny_base)


def test_single_file_cache_entry_follows_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The quantized cache is keyed on the file itself: another file at the same path (a new
    mtime and size) is quantized again, not served from the old entry."""
    checkpoint = tmp_path / "model.safetensors"
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    save_file(pipeline_to_ldm(pipeline), checkpoint)
    cache = tmp_path / "cache"
    first = load_base(checkpoint, config=tiny_model_dir, cache_dir=cache)
    with torch.no_grad():
        for parameter in pipeline.unet.parameters():
            parameter.mul_(1.5)
    save_file(pipeline_to_ldm(pipeline), checkpoint)
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = load_base(checkpoint, config=tiny_model_dir, cache_dir=cache)
    assert not second.from_cache
    assert second.fingerprint != first.fingerprint
    assert len(list(cache.iterdir())) == 2


def test_unknown_file_type_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match=r"\.safetensors/\.ckpt"):
        load_base(weights)
