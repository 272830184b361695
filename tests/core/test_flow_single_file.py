"""A FLUX or SD3 base from one transformer checkpoint file in the original layout, the rest of
the pipeline from a diffusers folder (``load_base(file, config=FOLDER)``).

No real FLUX/SD3 file is at hand offline, so the tiny models' transformers are written in the
original layouts by the inverse of diffusers' converters (below, written from
``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_sd3_transformer_checkpoint_to_diffusers``); the base read from that file must hold the
folder's weights exactly and draw the folder base's images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.cli import main
from tuneqdm_core.families import FAMILIES
from tuneqdm_core.families.single_file import flux_to_diffusers, load_transformer_file
from tuneqdm_core.generate import GenerationRequest, generate

ARCHS = ("tiny-flux", "tiny-sd3")
SIZE: dict[str, Any] = {"width": 32, "height": 32}
SD3_PREFIX = "model.diffusion_model."


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous takes (scale, shift), the original layouts (shift,
    scale): the same swap converts either way."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class _Writer:
    """Takes diffusers keys once each and writes original ones; ``check`` fails on leftovers."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.left = set(state)
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        self.left.remove(key)
        return self.state[key]

    def put(self, original: str, *diffusers: str, swap: bool = False) -> None:
        for param in ("weight", "bias"):
            if f"{diffusers[0]}.{param}" in self.state:
                tensor = torch.cat([self.take(f"{d}.{param}") for d in diffusers], dim=0)
                self.out[f"{original}.{param}"] = _swap_halves(tensor) if swap else tensor

    def norm(self, original: str, diffusers: str, param: str) -> None:
        self.out[f"{original}.{param}"] = self.take(f"{diffusers}.weight")

    def check(self) -> dict[str, torch.Tensor]:
        assert not self.left, sorted(self.left)[:5]
        return {k: v.contiguous().clone() for k, v in self.out.items()}


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix)})


def flux_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in Black Forest Labs' layout (flux1-dev.safetensors)."""
    w = _Writer(state)
    w.put("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    w.put("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    w.put("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    w.put("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    w.put("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    w.put("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    w.put("txt_in", "context_embedder")
    w.put("img_in", "x_embedder")
    for i in range(_count(state, "transformer_blocks.")):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        w.put(o + "img_mod.lin", d + "norm1.linear")
        w.put(o + "txt_mod.lin", d + "norm1_context.linear")
        w.put(o + "img_attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        w.put(
            o + "txt_attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"
        )
        w.norm(o + "img_attn.norm.query_norm", d + "attn.norm_q", "scale")
        w.norm(o + "img_attn.norm.key_norm", d + "attn.norm_k", "scale")
        w.norm(o + "txt_attn.norm.query_norm", d + "attn.norm_added_q", "scale")
        w.norm(o + "txt_attn.norm.key_norm", d + "attn.norm_added_k", "scale")
        w.put(o + "img_mlp.0", d + "ff.net.0.proj")
        w.put(o + "img_mlp.2", d + "ff.net.2")
        w.put(o + "txt_mlp.0", d + "ff_context.net.0.proj")
        w.put(o + "txt_mlp.2", d + "ff_context.net.2")
        w.put(o + "img_attn.proj", d + "attn.to_out.0")
        w.put(o + "txt_attn.proj", d + "attn.to_add_out")
    for i in range(_count(state, "single_transformer_blocks.")):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        w.put(o + "modulation.lin", d + "norm.linear")
        w.put(o + "linear1", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")
        w.norm(o + "norm.query_norm", d + "attn.norm_q", "scale")
        w.norm(o + "norm.key_norm", d + "attn.norm_k", "scale")
        w.put(o + "linear2", d + "proj_out")
    w.put("final_layer.linear", "proj_out")
    w.put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return w.check()


def sd3_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in Stability's MMDiT layout, keys under
    ``model.diffusion_model.`` as the SD3.5 single files have them."""
    w = _Writer(state)
    w.out["pos_embed"] = w.take("pos_embed.pos_embed")
    w.put("x_embedder.proj", "pos_embed.proj")
    w.put("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    w.put("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    w.put("context_embedder", "context_embedder")
    w.put("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    w.put("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    layers = _count(state, "transformer_blocks.")
    for i in range(layers):
        o, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == layers - 1
        x, c = o + "x_block.", o + "context_block."
        w.put(x + "attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        w.put(c + "attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")
        if d + "attn.norm_q.weight" in state:
            w.norm(x + "attn.ln_q", d + "attn.norm_q", "weight")
            w.norm(x + "attn.ln_k", d + "attn.norm_k", "weight")
            w.norm(c + "attn.ln_q", d + "attn.norm_added_q", "weight")
            w.norm(c + "attn.ln_k", d + "attn.norm_added_k", "weight")
        w.put(x + "attn.proj", d + "attn.to_out.0")
        if not last:
            w.put(c + "attn.proj", d + "attn.to_add_out")
        if d + "attn2.to_q.weight" in state:
            w.put(x + "attn2.qkv", d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v")
            if d + "attn2.norm_q.weight" in state:
                w.norm(x + "attn2.ln_q", d + "attn2.norm_q", "weight")
                w.norm(x + "attn2.ln_k", d + "attn2.norm_k", "weight")
            w.put(x + "attn2.proj", d + "attn2.to_out.0")
        w.put(x + "adaLN_modulation.1", d + "norm1.linear")
        w.put(c + "adaLN_modulation.1", d + "norm1_context.linear", swap=last)
        w.put(x + "mlp.fc1", d + "ff.net.0.proj")
        w.put(x + "mlp.fc2", d + "ff.net.2")
        if not last:
            w.put(c + "mlp.fc1", d + "ff_context.net.0.proj")
            w.put(c + "mlp.fc2", d + "ff_context.net.2")
    w.put("final_layer.linear", "proj_out")
    w.put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return {SD3_PREFIX + k: v for k, v in w.check().items()}


TO_ORIGINAL = {"tiny-flux": flux_to_original, "tiny-sd3": sd3_to_original}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def folder(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(arch) / "model"
    assert main(["build-tiny", "--arch", arch, str(path)]) == 0
    return path


def _float_transformer(folder: Path) -> Any:
    return DiffusionPipeline.from_pretrained(folder, local_files_only=True).transformer


def _write(folder: Path, arch: str, path: Path, extra: bool = False) -> Path:
    """The folder's transformer as one original-layout file (``extra``: with a VAE and a text
    encoder tensor beside it, as the all-in-one files have)."""
    state = TO_ORIGINAL[arch](_float_transformer(folder).state_dict())
    if extra:
        state["first_stage_model.decoder.conv_in.bias"] = torch.zeros(4)
        state["text_encoders.clip_l.transformer.text_model.final_layer_norm.bias"] = torch.ones(8)
    save_file(state, path)
    return path


def _image(base: BaseModel) -> np.ndarray:
    request = GenerationRequest("a photo of sks dog", steps=2, seed=3, **SIZE)
    return np.asarray(generate(base, [request])[0][0].image, dtype=np.int16)


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_flux_converter_is_diffusers_at_flux1_width() -> None:
    """At FLUX.1's width (3072, which diffusers' converter assumes) both converters give the
    same tensors: a fake checkpoint with FLUX.1's row counts and two columns."""
    from tuneqdm_core.builtin.tiny_dit import build_tiny_flux

    original = flux_to_original(build_tiny_flux().transformer.state_dict())
    rows = {"qkv": 3 * 3072, "linear1": 3 * 3072 + 4 * 3072}
    generator = torch.Generator().manual_seed(0)
    fake = {}
    for key, tensor in original.items():
        module, param = key.rsplit(".", 1)
        count = rows.get(module.rsplit(".", 1)[-1], tensor.shape[0])
        shape = (count,) if param != "weight" or tensor.dim() == 1 else (count, 2)
        fake[key] = torch.randn(shape, generator=generator)
    ours = flux_to_diffusers(dict(fake), {"num_attention_heads": 24, "attention_head_dim": 128})
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(fake))
    _assert_same_state(ours, theirs)


def test_single_file_base_is_the_folder_base(folder: Path, arch: str, tmp_path: Path) -> None:
    """The file's float transformer holds the folder's tensors exactly; the base quantized from
    it is the folder's (same state, same image), and a second start comes from the cache."""
    checkpoint = _write(
        folder, arch, tmp_path / "transformer.safetensors", extra=arch == "tiny-sd3"
    )
    family = FAMILIES[arch.removeprefix("tiny-")]
    loaded = load_transformer_file(family, str(checkpoint), str(folder))
    _assert_same_state(loaded.state_dict(), _float_transformer(folder).state_dict())
    folder_base = load_base(folder)
    cache = tmp_path / "cache"
    first = load_base(checkpoint, config=folder, cache_dir=cache)
    assert first.family is family and not first.from_cache
    assert first.source == str(checkpoint)
    _assert_same_state(first.unet.state_dict(), folder_base.unet.state_dict())
    assert first.fingerprint == folder_base.fingerprint
    image = _image(folder_base)
    assert np.array_equal(_image(first), image)
    again = load_base(checkpoint, config=folder, cache_dir=cache)
    assert again.from_cache and again.fingerprint == folder_base.fingerprint
    assert [p.name for p in cache.iterdir()] == [next(cache.iterdir()).name]
    assert next(cache.iterdir()).name.startswith("transformer-")
    assert np.array_equal(_image(again), image)


def test_cache_entry_follows_the_file(folder: Path, arch: str, tmp_path: Path) -> None:
    """Another file at the same path (new size or time) is quantized again."""
    checkpoint = _write(folder, arch, tmp_path / "transformer.safetensors")
    cache = tmp_path / "cache"
    load_base(checkpoint, config=folder, cache_dir=cache)
    stat = checkpoint.stat()
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not load_base(checkpoint, config=folder, cache_dir=cache).from_cache
    assert len(list(cache.iterdir())) == 2


def test_a_transformer_file_without_config_says_what_to_pass(
    folder: Path, arch: str, tmp_path: Path
) -> None:
    checkpoint = _write(folder, arch, tmp_path / "transformer.safetensors")
    name = arch.removeprefix("tiny-")
    with pytest.raises(ValueError, match=rf"{name} transformer checkpoint.*config"):
        load_base(checkpoint)
    with pytest.raises(ValueError, match="TUNEQDM_SINGLE_FILE_CONFIG"):
        load_base(checkpoint, config="")


def test_a_config_of_another_family_is_refused(
    folder: Path, arch: str, tmp_path: Path, tiny_model_dir: Path
) -> None:
    checkpoint = _write(folder, arch, tmp_path / "transformer.safetensors")
    name = arch.removeprefix("tiny-")
    other = tmp_path / "other"
    assert (
        main(["build-tiny", "--arch", "tiny-sd3" if name == "flux" else "tiny-flux", str(other)])
        == 0
    )
    with pytest.raises(ValueError, match=rf"is a {name} transformer checkpoint but config"):
        load_base(checkpoint, config=other)
    with pytest.raises(ValueError, match=rf"not a {name} pipeline"):
        load_base(checkpoint, config=tiny_model_dir)
