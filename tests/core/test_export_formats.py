"""Exports that load everywhere: per-layer ranks chosen by ``max_relative_error``, kohya/A1111
keys read by diffusers' own kohya conversion (SD 1.x and SDXL), and the merged model as one
original-layout checkpoint read back by diffusers' own single-file converter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file
from torch import nn

from tests.core.helpers import perturbed_adapter
from tuneqdm_core import Adapter, AdapterConfig, QuantConfig, save_adapter
from tuneqdm_core.base import load_base
from tuneqdm_core.cli import main
from tuneqdm_core.configs import example_inputs
from tuneqdm_core.export import (
    WARN_RELATIVE_ERROR,
    ExportOptions,
    adapter_weight,
    export_adapter,
    export_lora,
    interval_weights,
)
from tuneqdm_core.model import quant_state


def _setup(model_dir: Path, cache: Path) -> tuple[nn.Module, Adapter, DiffusionPipeline]:
    quantized = load_base(model_dir, quant=QuantConfig(bits=4), cache_dir=cache).unet
    torch.manual_seed(5)
    adapter = perturbed_adapter(quantized, AdapterConfig(intervals=2))
    pipe = DiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return quantized, adapter, pipe


def _with_lora(unet: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The reference: a copy of the float UNet with ``W + B·A`` written into each layer."""
    reference = copy.deepcopy(unet)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for key, a in tensors.items():
            if key.endswith(".lora_A.weight"):
                name = key[len("unet.") : -len(".lora_A.weight")]
                b = tensors[f"unet.{name}.lora_B.weight"]
                weight = modules[name].weight
                weight += (b.flatten(1) @ a.flatten(1)).reshape(weight.shape)
    return reference


@torch.no_grad()
def _out(unet: nn.Module) -> torch.Tensor:
    torch.manual_seed(2)
    return unet(**example_inputs(unet, 2, torch.tensor([100, 900]))).sample


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_max_relative_error_picks_per_layer_ranks_that_diffusers_loads(
    tiny_model_dir: Path, quant_cache: Path, tmp_path: Path
) -> None:
    quantized, adapter, pipe = _setup(tiny_model_dir, quant_cache)
    bound = 0.05
    export = export_lora(quantized, pipe.unet, adapter, max_relative_error=bound)
    assert export.error <= bound
    assert all(e <= bound for e in export.layer_errors.values())
    ranks = set(export.layer_ranks.values())
    assert len(ranks) > 1, ranks  # chosen per layer, not one rank for all
    # Each layer's rank is the smallest within the bound: one less would exceed it.
    weights = interval_weights(adapter, "mean")
    state = quant_state(quantized)
    modules = dict(pipe.unet.named_modules())
    for index, (name, layer) in enumerate(state.layers[:6]):
        float_weight = modules[name].weight.detach().flatten(1)
        delta = adapter_weight(layer, adapter, index, weights) - float_weight
        energy = torch.linalg.svdvals(delta.double()).pow(2)
        error_at = [float((energy[r:].sum() / energy.sum()).sqrt()) for r in range(len(energy) + 1)]
        rank = export.layer_ranks[name]
        assert error_at[rank] <= bound and (rank == 1 or error_at[rank - 1] > bound)

    summary = export_adapter(
        quantized,
        pipe.unet,
        adapter,
        tmp_path / "lora.safetensors",
        ExportOptions(max_relative_error=bound),
    )
    assert summary["relative_error"] == pytest.approx(export.error)
    assert summary["bytes"] == (tmp_path / "lora.safetensors").stat().st_size
    assert summary["warnings"] == []
    reference = _out(_with_lora(pipe.unet, export.tensors))
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert _rel(_out(pipe.unet), reference) < 1e-5


def test_the_service_warns_at_the_librarys_threshold() -> None:
    from app.schemas.exports import WARN_RELATIVE_ERROR as SERVICE_THRESHOLD

    assert SERVICE_THRESHOLD == WARN_RELATIVE_ERROR


def test_a_fixed_rank_that_loses_much_is_warned_about(
    tiny_model_dir: Path, quant_cache: Path, tmp_path: Path
) -> None:
    quantized, adapter, pipe = _setup(tiny_model_dir, quant_cache)
    summary = export_adapter(
        quantized, pipe.unet, adapter, tmp_path / "r1.safetensors", ExportOptions(rank=1)
    )
    assert summary["relative_error"] > WARN_RELATIVE_ERROR
    assert len(summary["warnings"]) == 1 and "max_relative_error" in summary["warnings"][0]
    with pytest.raises(ValueError, match="either a rank or a max_relative_error"):
        ExportOptions(rank=4, max_relative_error=0.1)
    with pytest.raises(ValueError, match=r"max_relative_error must be in \(0, 1\)"):
        ExportOptions(max_relative_error=1.5)


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_kohya_keys_load_through_diffusers_kohya_conversion(
    tiny_model_dir: Path, tiny_xl_dir: Path, quant_cache: Path, tmp_path: Path, xl: bool
) -> None:
    quantized, adapter, pipe = _setup(tiny_xl_dir if xl else tiny_model_dir, quant_cache)
    out = tmp_path / "kohya.safetensors"
    summary = export_adapter(
        quantized, pipe.unet, adapter, out, ExportOptions(format="lora-kohya", rank=8)
    )
    state = load_file(out)
    assert all(k.startswith("lora_unet_") for k in state)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else "alpha" for k in state} == {
        "lora_down",
        "lora_up",
        "alpha",
    }
    if xl:  # kohya's SDXL names are the original (SGM) ones
        assert any(k.startswith("lora_unet_input_blocks_") for k in state)
    peft = export_lora(quantized, pipe.unet, adapter, rank=8)
    assert summary["relative_error"] == pytest.approx(peft.error)
    reference = _out(_with_lora(pipe.unet, peft.tensors))
    pipe.load_lora_weights(state)  # a kohya state dict: diffusers converts it itself
    loaded = {n for n, _ in pipe.unet.named_modules() if n.endswith("lora_A")}
    assert len(loaded) == len(quant_state(quantized).layers)  # every layer came through
    assert _rel(_out(pipe.unet), reference) < 1e-5


@pytest.mark.parametrize("xl", [False, True], ids=["sd1", "sdxl"])
def test_merged_checkpoint_converts_back_to_the_merged_unet(
    tiny_model_dir: Path, tiny_xl_dir: Path, quant_cache: Path, tmp_path: Path, xl: bool
) -> None:
    model_dir = tiny_xl_dir if xl else tiny_model_dir
    quantized, adapter, pipe = _setup(model_dir, quant_cache)
    out = tmp_path / "merged.safetensors"
    summary = export_adapter(
        quantized, pipe.unet, adapter, out, ExportOptions(format="merged-checkpoint"), pipeline=pipe
    )
    assert summary["relative_error"] == 0.0  # float32: Ŵ exactly
    assert summary["bytes"] == out.stat().st_size
    merged = pipe.unet.state_dict()
    # diffusers' own converter gives back the merged UNet's weights exactly.
    checkpoint = load_file(out)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(pipe.unet.config))
    assert converted.keys() == merged.keys()
    assert all(torch.equal(converted[k], merged[k]) for k in merged)
    if xl:
        # Loading an SDXL single file with config= is tests/core/test_sdxl.py's; without one,
        # diffusers tells SDXL by a key of the 32-layer OpenCLIP encoder the tiny one lacks.
        return
    # Without a config, from_single_file recognises the file by its keys as SD 1.x: what it
    # then needs is that architecture's configs (from the hub, or its local cache), which
    # this offline test cannot have, and which would not fit the tiny model's shapes anyway.
    assert infer_diffusers_model_type(checkpoint) == "v1"
    # Given the configs, the file loads through from_single_file as the merged pipeline.
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(model_dir))
    assert all(torch.equal(loaded.unet.state_dict()[k], merged[k]) for k in merged)
    assert all(torch.equal(loaded.vae.state_dict()[k], v) for k, v in pipe.vae.state_dict().items())


def test_the_cli_reports_error_size_and_warning(
    tiny_model_dir: Path,
    quant_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, adapter, _ = _setup(tiny_model_dir, quant_cache)
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    common = [str(tiny_model_dir), "--adapter", str(path), "--cache-dir", str(quant_cache)]
    out = tmp_path / "k.safetensors"
    assert main(["export", *common, "--format", "lora-kohya", "--max-relative-error", "0.05",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr()
    summary = json.loads(printed.out.strip().splitlines()[-1].split(": ", 1)[1])
    assert summary["format"] == "kohya-lora" and summary["relative_error"] <= 0.05
    assert summary["bytes"] == out.stat().st_size and "warning" not in printed.err
    assert main(["export", *common, "--rank", "1", "--out", str(tmp_path / "r1.safetensors")]) == 0
    assert "tuneqdm export: warning: rank 1 keeps" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not allowed with argument --rank
        main(["export", *common, "--rank", "4", "--max-relative-error", "0.1", "--out", str(out)])
