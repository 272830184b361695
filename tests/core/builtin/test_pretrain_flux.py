"""``tuneqdm pretrain --family flux``: a FLUX-family model on the scenes of models/fashion-sd."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from app.settings import BUILTIN_MODEL
from tests.core.builtin.data import fashion_dir, needs_fashion
from tuneqdm_core.base import load_base
from tuneqdm_core.builtin.pretrain import verify_checksums
from tuneqdm_core.builtin.pretrain_flux import (
    FluxPretrainConfig,
    as_base,
    build_flux_pipeline,
    build_transformer,
    flux_loss,
    pretrain_flux,
    sample_grid_flux,
)
from tuneqdm_core.builtin.scenes import SIZE, SceneSampler, background_of, load_fashion, shrink
from tuneqdm_core.cli import main
from tuneqdm_core.families.flux import FLUX
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.model import QuantConfig

# A smaller transformer than the default, so that the tests take seconds.
SMALL = FluxPretrainConfig(
    steps=3, batch_size=4, warmup=1, width=64, double_layers=1, single_layers=1, t5_width=32
)


@needs_fashion
def test_pretrain_flux_writes_a_flux_pipeline_that_loads_and_draws(tmp_path: Path) -> None:
    out = tmp_path / "flux"
    record = pretrain_flux(
        out, SMALL, data_dir=fashion_dir(), init_vae=BUILTIN_MODEL, log=lambda _: None
    )
    assert record["family"] == "flux" and record["steps_done"] == 3
    assert record["continues"] is None and record["loss_first100"] > 0
    assert set(record["parameters"]) == {"transformer", "vae", "text", "text_2"}
    assert json.loads((out / "pretrain.json").read_text()) == record
    assert verify_checksums(out) == []
    assert main(["check-model", str(out)]) == 0

    pipeline = FluxPipeline.from_pretrained(out, local_files_only=True)
    assert pipeline.transformer.config.in_channels // 4 == pipeline.vae.config.latent_channels
    assert pipeline.vae.config.shift_factor is not None  # measured: FluxPipeline adds it
    assert pipeline.tokenizer_2.model_max_length == 32
    # The VAE is fashion-sd's, its weights unchanged.
    weights = "vae/diffusion_pytorch_model.safetensors"
    shipped, written = load_file(BUILTIN_MODEL / weights), load_file(out / weights)
    assert shipped.keys() == written.keys()
    assert all(torch.equal(shipped[k], written[k]) for k in shipped)
    assert (out / "tokenizer" / "vocab.json").is_file()

    base = load_base(out, quant=QuantConfig(bits=4))
    assert base.family is FLUX
    images = generate(base, [GenerationRequest("a photo of a bag", steps=2, width=32, height=32)])
    assert images[0][0].image.size == (SIZE, SIZE)
    grid = sample_grid_flux(out, steps=1)
    assert grid.size == (5 * SIZE, 10 * SIZE)

    # Training further keeps the earlier record.
    more = pretrain_flux(tmp_path / "more", SMALL, data_dir=fashion_dir(), init=out, log=print)
    assert more["continues"]["steps_done"] == 3 and more["vae_from"] is None


@needs_fashion
def test_flux_loss_falls_on_a_fixed_batch() -> None:
    """The objective trains: a few AdamW steps on one batch (same σ and noise each time)
    lower its loss."""
    dev = torch.device("cpu")
    images, labels = load_fashion("train", fashion_dir())
    sampler = SceneSampler(shrink(images[:500]), labels[:500], seed=0)
    pipeline = build_flux_pipeline(BUILTIN_MODEL, SMALL, sampler, dev)
    base = as_base(pipeline, dev)
    scheduler = FLUX.training_scheduler(base)
    pixels, captions = sampler.batch(8)
    trained = [*pipeline.transformer.parameters(), *pipeline.text_encoder_2.parameters()]
    optimizer = torch.optim.AdamW(trained, lr=2e-3)

    def fixed_loss() -> torch.Tensor:
        torch.manual_seed(0)
        return flux_loss(base, scheduler, torch.Generator().manual_seed(0))(pixels, captions)

    losses = []
    for _ in range(12):
        loss = fixed_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_default_flux_model_fits_25_mb() -> None:
    """The default transformer in fp32 with fashion-sd's VAE and CLIP, T5 and tokenizers."""
    config = FluxPretrainConfig()
    transformer = build_transformer(config, pooled_dim=64)
    count = sum(p.numel() for p in transformer.parameters())
    assert 4_000_000 < count < 5_000_000
    reused = sum(
        f.stat().st_size
        for part in ("vae", "text_encoder", "tokenizer")
        for f in (BUILTIN_MODEL / part).iterdir()
    )
    t5 = 100_000 * 4  # t5_width 64, 2 layers: under 0.1 M parameters
    assert 4 * count + reused + t5 < 25_000_000


def test_pretrain_flux_options(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="takes no --vae-steps"):
        main(["pretrain", str(tmp_path / "m"), "--family", "flux", "--vae-steps", "3"])
    with pytest.raises(SystemExit, match="--init-vae is for --family flux"):
        main(["pretrain", str(tmp_path / "m"), "--init-vae", str(BUILTIN_MODEL)])


FLUX_MODEL = BUILTIN_MODEL.parent / "fashion-flux"


def test_shipped_flux_model_matches_its_checksums_and_record() -> None:
    assert verify_checksums(FLUX_MODEL) == []
    record = json.loads((FLUX_MODEL / "pretrain.json").read_text())
    # One hour-long CPU run (docs/builtin-model.md has the command).
    assert record["family"] == "flux" and record["steps_done"] > 3000
    assert record["vae_from"] == "models/fashion-sd"
    assert main(["check-model", str(FLUX_MODEL)]) == 0
    assert sum(f.stat().st_size for f in FLUX_MODEL.rglob("*") if f.is_file()) < 25e6


def test_shipped_flux_model_draws_the_background_it_is_asked_for() -> None:
    """What the CPU run reached: the colour named in the prompt is the colour drawn, with
    classifier-free guidance through FluxPipeline as its sample grid draws."""
    pipeline = FluxPipeline.from_pretrained(FLUX_MODEL, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    colours = ["red", "blue", "yellow", "white"]
    prompts = [f"a photo of a bag on a {colour} background" for colour in colours]
    images = pipeline(
        prompts,
        negative_prompt=[""] * len(prompts),
        true_cfg_scale=4.0,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=15,
        max_sequence_length=pipeline.tokenizer_2.model_max_length,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert [background_of(image * 2 - 1) for image in images] == colours
