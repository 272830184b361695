"""Exports load into a plain diffusers pipeline of the float base and draw what the adapter
draws on the quantized base: the merged UNet exactly, the LoRA better with every rank."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from torch import nn

from tests.core.helpers import perturbed_adapter
from tuneqdm_core import (
    Adapter,
    AdapterConfig,
    QuantConfig,
    quant_state,
    quantize_,
    save_adapter,
    set_route,
    use_adapter,
)
from tuneqdm_core.base import load_base
from tuneqdm_core.builtin.tiny import save_tiny_pipeline
from tuneqdm_core.cli import main
from tuneqdm_core.export import (
    METADATA_KEY,
    export_lora,
    interval_weights,
    merge_adapter,
    save_lora,
    save_merged_unet,
)
from tuneqdm_core.generate import GenerationRequest, generate

# Full rank of the tiny UNet: its widest layer has min(O, K) = 128.
FULL_RANK = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("export") / "tiny")


@pytest.fixture(scope="module")
def quantized(model_dir: Path) -> nn.Module:
    return load_base(model_dir, quant=QuantConfig(bits=4)).unet


def _float_pipeline(model_dir: Path) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _adapter(unet: nn.Module, intervals: int) -> Adapter:
    torch.manual_seed(intervals)
    return perturbed_adapter(unet, AdapterConfig(intervals=intervals))


def _inputs(t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    return x, torch.tensor([t, t]), torch.randn(2, 77, 32, generator=generator)


@torch.no_grad()
def _with_adapter(unet: nn.Module, adapter: Adapter, t: int) -> torch.Tensor:
    x, timesteps, embeds = _inputs(t)
    use_adapter(unet, adapter, timesteps)
    try:
        return unet(x, timesteps, encoder_hidden_states=embeds).sample
    finally:
        set_route(unet, None)


@torch.no_grad()
def _plain(unet: nn.Module, t: int) -> torch.Tensor:
    x, timesteps, embeds = _inputs(t)
    return unet(x, timesteps, encoder_hidden_states=embeds).sample


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize(("interval", "t"), [(0, 100), (1, 900)])
def test_merged_unet_matches_the_adapter_on_the_quantized_base(
    tmp_path: Path, model_dir: Path, quantized: nn.Module, interval: int, t: int
) -> None:
    adapter = _adapter(quantized, intervals=2)
    want = _with_adapter(quantized, adapter, t)
    pipe = _float_pipeline(model_dir)
    assert _rel(_plain(pipe.unet, t), want) > 0.1  # the adapter changes the output a lot
    merged = merge_adapter(quantized, pipe.unet, adapter, interval=interval)
    # Ŵ is written exactly: only float rounding separates the two computations.
    assert _rel(_plain(merged, t), want) < 1e-5
    other = 1 - interval  # the other interval's weight is a different model
    wrong = merge_adapter(quantized, _float_pipeline(model_dir).unet, adapter, interval=other)
    assert _rel(_plain(wrong, t), want) > 1e-2

    save_merged_unet(merged, tmp_path / "unet")
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert _rel(_plain(loaded, t), want) < 1e-5
    save_merged_unet(copy.deepcopy(merged), tmp_path / "unet16", fp16=True)
    half = UNet2DConditionModel.from_pretrained(tmp_path / "unet16").float()
    assert _rel(_plain(half, t), want) < 1e-2  # fp16 weights: ~3 significant digits


def test_lora_error_falls_with_rank_and_vanishes_at_full_rank(
    tmp_path: Path, model_dir: Path, quantized: nn.Module
) -> None:
    adapter = _adapter(quantized, intervals=2)
    t = 100
    want = _with_adapter(quantized, adapter, t)
    output_errors, file_errors = [], []
    for rank in (4, 32, FULL_RANK):
        path = save_lora(
            export_lora(quantized, _float_pipeline(model_dir).unet, adapter, rank=rank, interval=0),
            tmp_path / f"r{rank}.safetensors",
        )
        pipe = _float_pipeline(model_dir)
        pipe.load_lora_weights(path)  # diffusers reads the PEFT layout as is
        output_errors.append(_rel(_plain(pipe.unet, t), want))
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads(handle.metadata()[METADATA_KEY])
            a = handle.get_tensor("unet.conv_in.lora_A.weight")
            b = handle.get_tensor("unet.conv_in.lora_B.weight")
        assert metadata["rank"] == rank and metadata["interval"] == 0
        assert set(metadata["layer_relative_errors"]) == {
            name for name, _ in quant_state(quantized).layers
        }
        file_errors.append(metadata["relative_error"])
        # PEFT's conv LoRA: A keeps the 3×3 kernel, B is 1×1.
        assert tuple(a.shape) == (rank, 4, 3, 3) and tuple(b.shape) == (32, rank, 1, 1)
    assert output_errors[0] > output_errors[1] > output_errors[2]
    assert file_errors[0] > file_errors[1] > file_errors[2] == 0.0
    assert output_errors[2] < 1e-5  # full rank: Ŵ exactly, quantization error included


def test_lora_without_quantization_error_keeps_the_float_precision(
    tmp_path: Path, model_dir: Path, quantized: nn.Module
) -> None:
    """``D = Ŵ − dequant(q)``: at full rank the float pipeline computes ``W + Ŵ − dequant(q)``,
    not ``Ŵ``: what separates it from the adapter's output is the base's quantization error."""
    adapter = _adapter(quantized, intervals=1)
    float_unet = _float_pipeline(model_dir).unet
    export = export_lora(
        quantized, float_unet, adapter, rank=FULL_RANK, include_quantization_error=False
    )
    assert export.error == 0.0
    pipe = _float_pipeline(model_dir)
    pipe.load_lora_weights(save_lora(export, tmp_path / "l.safetensors"))
    want = _with_adapter(quantized, adapter, 500)
    gap = _rel(_plain(pipe.unet, 500), want)
    quantization_gap = _rel(_plain(float_unet, 500), _plain(quantized, 500))
    assert 0.2 * quantization_gap < gap < 5 * quantization_gap


def test_images_of_the_exports_match_the_adapter_on_the_quantized_base(
    tmp_path: Path, model_dir: Path, quantized: nn.Module
) -> None:
    base = load_base(model_dir, quant=QuantConfig(bits=4))
    adapter = _adapter(base.unet, intervals=1)
    request = GenerationRequest("a photo of sks bag", adapter, steps=4, width=32, height=32, seed=3)
    want = np.asarray(generate(base, [request])[0][0].image, dtype=np.float32)
    plain = _float_pipeline(model_dir)
    merged = _float_pipeline(model_dir)
    merge_adapter(base.unet, merged.unet, adapter)
    lora = _float_pipeline(model_dir)
    export = export_lora(base.unet, plain.unet, adapter, rank=FULL_RANK)
    lora.load_lora_weights(save_lora(export, tmp_path / "l.safetensors"))

    def draw(pipe: StableDiffusionPipeline) -> np.ndarray:
        # generate() draws each image's noise from torch.Generator().manual_seed(seed).
        image = pipe(
            request.prompt,
            num_inference_steps=request.steps,
            guidance_scale=request.guidance_scale,
            width=32,
            height=32,
            generator=torch.Generator().manual_seed(request.seed),
        ).images[0]
        return np.asarray(image, dtype=np.float32)

    assert np.abs(draw(plain) - want).mean() > 5  # the adapter's images differ from the base's
    for pipe in (merged, lora):
        assert np.abs(draw(pipe) - want).max() <= 2  # 8-bit pixels: rounding only


def test_mean_interval_is_the_time_weighted_mean(model_dir: Path, quantized: nn.Module) -> None:
    adapter = _adapter(quantized, intervals=2)
    assert interval_weights(adapter, "mean") == [0.5, 0.5]
    unets = [
        merge_adapter(quantized, _float_pipeline(model_dir).unet, adapter, interval=k)
        for k in ("mean", 0, 1)
    ]
    for (name, mean), (_, w0), (_, w1) in zip(
        *(unet.named_parameters() for unet in unets), strict=True
    ):
        assert torch.allclose(mean, (w0 + w1) / 2, atol=1e-6), name


def test_bad_requests_say_what_to_fix(model_dir: Path, quantized: nn.Module) -> None:
    adapter = _adapter(quantized, intervals=2)
    float_unet = _float_pipeline(model_dir).unet
    with pytest.raises(ValueError, match=r"interval must be 'mean' or an index in \[0, 2\)"):
        export_lora(quantized, float_unet, adapter, rank=4, interval=2)
    with pytest.raises(ValueError, match="rank must be at least 1"):
        export_lora(quantized, float_unet, adapter, rank=0)
    other_dir = save_tiny_pipeline(model_dir.parent / "seed1", seed=1)
    other = UNet2DConditionModel.from_pretrained(other_dir / "unet")
    with pytest.raises(ValueError, match="do not quantize to the base's codes"):
        merge_adapter(quantized, other, adapter)


def test_cli_exports_a_lora_and_a_single_file_merged_unet(
    tmp_path: Path, model_dir: Path, quantized: nn.Module, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = _adapter(quantized, intervals=2)
    adapter_path = save_adapter(adapter, tmp_path / "a.safetensors")
    common = [str(model_dir), "--adapter", str(adapter_path), "--interval", "1"]
    lora_path, unet_path = tmp_path / "lora.safetensors", tmp_path / "merged.safetensors"
    assert main(["export", *common, "--rank", "8", "--out", str(lora_path)]) == 0
    assert "relative_error" in capsys.readouterr().out
    assert main(["export", *common, "--format", "merged", "--out", str(unet_path)]) == 0
    want = _with_adapter(quantized, adapter, 900)

    merged = UNet2DConditionModel.from_single_file(
        str(unet_path), config=str(model_dir), subfolder="unet"
    )
    assert _rel(_plain(merged, 900), want) < 1e-5
    pipe = _float_pipeline(model_dir)
    pipe.load_lora_weights(lora_path)
    with safe_open(str(lora_path), framework="pt") as handle:
        metadata = json.loads(handle.metadata()[METADATA_KEY])
    assert metadata["rank"] == 8 and metadata["interval"] == 1
    # The file's error is over weights; the output error tracks it (same order).
    assert 0.1 * metadata["relative_error"] < _rel(_plain(pipe.unet, 900), want) < 1.0

    assert main(["export", *common, "--rank", "0", "--out", str(tmp_path / "x")]) == 2
    assert "rank must be at least 1" in capsys.readouterr().err


def test_merge_handles_grouped_convs_and_refuses_them_as_lora() -> None:
    torch.manual_seed(0)
    float_model = nn.Sequential(
        nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.Conv2d(12, 6, 1), nn.Flatten()
    )
    model = copy.deepcopy(float_model)
    quantize_(model, QuantConfig(bits=8))
    adapter = perturbed_adapter(model, AdapterConfig(intervals=1))
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        use_adapter(model, adapter, [10, 10])
        want = model(x)
        set_route(model, None)
        got = merge_adapter(model, float_model, adapter)(x)
    assert _rel(got, want) < 1e-5
    with pytest.raises(ValueError, match=r"groups=4.*export the merged UNet instead"):
        export_lora(model, copy.deepcopy(float_model), adapter, rank=2)
