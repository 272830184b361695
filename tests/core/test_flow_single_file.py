"""A FLUX or SD3 base from one transformer checkpoint file in the original layout, the rest of
the pipeline from a diffusers folder (``load_base(file, config=FOLDER)``).

No real FLUX/SD3 file is at hand offline, so the tiny models' transformers are written in the
original layouts by the inverse of diffusers' converters (tests/core/dit_layout.py); the base
read from that file must hold the folder's weights exactly and draw the folder base's
images."""

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

from tests.conftest import subject_photos
from tests.core.dit_layout import flux_to_original, sd3_to_original
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.cli import main
from tuneqdm_core.families import FAMILIES
from tuneqdm_core.families.single_file import flux_to_diffusers, load_transformer_file
from tuneqdm_core.generate import GenerationRequest, generate

ARCHS = ("tiny-flux", "tiny-sd3")
SIZE: dict[str, Any] = {"width": 32, "height": 32}

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


def test_cli_exports_from_the_file_what_it_exports_from_the_folder(
    folder: Path, arch: str, tmp_path: Path
) -> None:
    """``tuneqdm export FILE --config FOLDER``: the float transformer comes from the file, and
    the LoRA equals the folder base's."""
    from safetensors.torch import load_file

    checkpoint = _write(folder, arch, tmp_path / "transformer.safetensors")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(subject_photos(2)):
        photo.save(photos / f"{i}.png")
    adapter = tmp_path / "a.safetensors"
    steps = ["--steps", "2", "--resolution", "32", "--num-class-images", "0"]
    assert main(["finetune", str(checkpoint), "--config", str(folder), "--images", str(photos),
                 "--prompt", "a photo of sks dog", "--out", str(adapter), *steps]) == 0  # fmt: skip
    loras: list[dict[str, torch.Tensor]] = []
    for model in ([str(checkpoint), "--config", str(folder)], [str(folder)]):
        lora = tmp_path / f"lora-{len(loras)}.safetensors"
        assert main(["export", *model, "--adapter", str(adapter), "--format", "lora",
                     "--rank", "4", "--out", str(lora)]) == 0  # fmt: skip
        loras.append(load_file(lora))
    _assert_same_state(*loras)


def test_a_transformer_file_in_diffusers_layout_reads_too(folder: Path, arch: str) -> None:
    """The folder's own ``transformer/diffusion_pytorch_model.safetensors`` as the file."""
    checkpoint = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    family = FAMILIES[arch.removeprefix("tiny-")]
    loaded = load_transformer_file(family, str(checkpoint), str(folder))
    _assert_same_state(loaded.state_dict(), _float_transformer(folder).state_dict())
    assert load_base(checkpoint, config=folder).fingerprint == load_base(folder).fingerprint
