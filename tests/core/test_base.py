"""Loading models through diffusers' from_pretrained, and the quantized-UNet cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.configs import example_inputs
from tuneqdm_core.model import QuantConfig, quant_state


def test_tiny_pipeline_folder_has_the_standard_layout(tiny_model_dir: Path) -> None:
    index = json.loads((tiny_model_dir / "model_index.json").read_text())
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert part in index and (tiny_model_dir / part).is_dir()
    assert (tiny_model_dir / "tokenizer" / "vocab.json").is_file()


def test_tokenizer_knows_prompt_words_and_every_character(tiny_base: BaseModel) -> None:
    tokenizer = tiny_base.tokenizer
    ids = tokenizer("a photo of sks dog").input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[1:-1] == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "sks</w>",
        "dog</w>",
    ]
    odd = tokenizer("Zebra ünïcode!").input_ids
    assert tokenizer.unk_token_id not in odd[1:-1]


def test_cached_base_loads_the_same_quantized_unet(tiny_model_dir: Path, tmp_path: Path) -> None:
    first = load_base(tiny_model_dir, cache_dir=tmp_path)
    second = load_base(tiny_model_dir, cache_dir=tmp_path)
    assert not first.from_cache and second.from_cache
    assert first.fingerprint == second.fingerprint
    # The cache's stored fingerprint is what the loaded tensors hash to.
    assert quant_state(second.unet).compute_fingerprint() == first.fingerprint
    with pytest.raises(ValueError, match="sha256"):
        quant_state(second.unet).restore_fingerprint("not-a-digest")
    inputs = example_inputs(first.unet, 2, torch.tensor([3, 700]))
    with torch.no_grad():
        assert torch.equal(first.unet(**inputs).sample, second.unet(**inputs).sample)
    # Another recipe is another cache entry, not a wrong hit.
    eight = load_base(tiny_model_dir, quant=QuantConfig(bits=8), cache_dir=tmp_path)
    assert not eight.from_cache and eight.fingerprint != first.fingerprint


def test_missing_model_says_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a local model folder nor a hub id"):
        load_base(tmp_path / "no-such-model")
