"""The built-in model: the pretraining command and the weights shipped in models/fashion-sd."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import pytest

from app.settings import BUILTIN_MODEL
from tests.core.builtin.data import fashion_dir, needs_fashion
from tuneqdm_core.base import load_base
from tuneqdm_core.builtin.pretrain import PretrainConfig, pretrain, verify_checksums
from tuneqdm_core.builtin.scenes import SIZE, background_of
from tuneqdm_core.cli import main
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.images import to_training_tensor
from tuneqdm_core.model import QuantConfig


def test_shipped_model_matches_its_checksums_and_record() -> None:
    assert verify_checksums(BUILTIN_MODEL) == []
    record = json.loads((BUILTIN_MODEL / "pretrain.json").read_text())
    # Trained in two runs (docs/builtin-model.md has the commands).
    assert record["steps_done"] > 1000 and record["continues"]["steps_done"] > 1000
    assert main(["check-model", str(BUILTIN_MODEL)]) == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_shipped_model_draws_the_background_it_is_asked_for(
    bits: Literal[4, 8], tmp_path: Path
) -> None:
    """Its images mean something: the colour named in the prompt is the colour drawn, also
    after quantization."""
    base = load_base(BUILTIN_MODEL, quant=QuantConfig(bits=bits), cache_dir=tmp_path)
    colours = ["red", "blue", "yellow", "white"]
    requests = [
        GenerationRequest(
            prompt=f"a photo of a bag on a {colour} background",
            steps=15,
            guidance_scale=4.0,
            width=SIZE,
            height=SIZE,
            seed=i,
        )
        for i, colour in enumerate(colours)
    ]
    drawn = [
        background_of(to_training_tensor(result[0].image, SIZE))
        for result in generate(base, requests)
    ]
    assert drawn == colours


@needs_fashion
def test_pretrain_writes_a_loadable_model_with_checksums(tmp_path: Path) -> None:
    out = tmp_path / "model"
    config = PretrainConfig(steps=3, batch_size=4, vae_steps=2, warmup=1)
    record = pretrain(out, config, data_dir=fashion_dir(), log=lambda _: None)
    assert record["steps_done"] == 3 and record["continues"] is None
    assert verify_checksums(out) == []
    base = load_base(out, quant=QuantConfig(bits=4))
    image = generate(base, [GenerationRequest("a photo of a bag", steps=2, width=32, height=32)])
    assert image[0][0].image.size == (32, 32)

    # Training further keeps the earlier record.
    more = pretrain(tmp_path / "more", config, data_dir=fashion_dir(), init=out, log=print)
    assert more["continues"]["steps_done"] == 3

    (out / "unet" / "config.json").write_text("{}")
    shutil.rmtree(out / "vae")
    changed = verify_checksums(out)
    assert "unet/config.json" in changed and "vae/config.json" in changed
    assert main(["check-model", str(out)]) == 1


def test_pretrain_without_the_dataset_says_how_to_get_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["pretrain", str(tmp_path / "m"), "--data-dir", str(tmp_path), "--steps", "1"])
    assert code == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
