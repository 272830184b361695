"""A transformer base (FLUX, SD3) is described alike from its folder's config files (what the
API and a starting worker read) and from the loaded model (what a worker registers once it has
loaded it), its guidance kind included (the built-in models/fashion-flux: classifier-free); the
API's per-family tables (app/families.py) agree with the core's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import get_args

import pytest

from app.bases import NATIVE_RESOLUTION_KEY, describe_folder
from app.families import GENERATION_RULES, GUIDANCE_KEY, PIPELINES, UNET_SCHEDULERS
from app.schemas import Scheduler
from app.settings import Settings
from tuneqdm_core.base import load_base
from tuneqdm_core.families import FAMILIES
from tuneqdm_core.families.flow import NATIVE_RESOLUTION_KEY as CORE_NATIVE_RESOLUTION_KEY
from tuneqdm_core.families.flux import GUIDANCE_KEY as CORE_GUIDANCE_KEY
from tuneqdm_core.generate import SCHEDULERS as UNET_CORE_SCHEDULERS
from worker.bases import loaded_info


def test_the_api_tables_agree_with_the_core() -> None:
    assert {
        name: family.name for family in FAMILIES.values() for name in family.pipeline_names
    } == (PIPELINES)
    assert set(UNET_SCHEDULERS) == set(UNET_CORE_SCHEDULERS)
    assert GUIDANCE_KEY == CORE_GUIDANCE_KEY
    assert NATIVE_RESOLUTION_KEY == CORE_NATIVE_RESOLUTION_KEY
    for (family, _guidance), rules in GENERATION_RULES.items():
        core = FAMILIES.get(family)
        schedulers = set(core.schedulers) if core is not None else set(UNET_CORE_SCHEDULERS)
        assert set(rules.schedulers) == schedulers, family
        assert rules.scheduler in rules.schedulers
    # The request schema's names are every family's.
    every = {name for rules in GENERATION_RULES.values() for name in rules.schedulers}
    assert set(get_args(Scheduler)) == every


FASHION_FLUX = Path(__file__).resolve().parents[2] / "models" / "fashion-flux"


@pytest.mark.parametrize("arch", ["tiny-flux", "tiny-sd3", "tiny-sd", "tiny-sdxl", "fashion-flux"])
def test_folder_and_loaded_model_describe_the_same_base(
    arch: str,
    tiny_flux_dir: Path,
    tiny_sd3_dir: Path,
    tiny_model_dir: Path,
    tiny_xl_dir: Path,
    quant_cache: Path,
) -> None:
    folder = {
        "tiny-flux": tiny_flux_dir,
        "tiny-sd3": tiny_sd3_dir,
        "tiny-sd": tiny_model_dir,
        "tiny-sdxl": tiny_xl_dir,
        "fashion-flux": FASHION_FLUX,
    }[arch]
    settings = Settings(model=str(folder), base_model=arch, bits=4)
    from_folder = describe_folder(folder, name=arch, bits=4)
    base = load_base(folder, cache_dir=quant_cache)
    assert from_folder == loaded_info(settings, base)
    expected = {
        # FluxPipeline's default_sample_size 128 × the tiny VAE's factor 2; sides pack 2×2
        # latents (4 px), kept multiples of 8.
        "tiny-flux": ("flux", "embedded", 256, "flow", 8),
        # SD3: the transformer's sample_size 16 × 2.
        "tiny-sd3": ("sd3", "cfg", 32, "flow", 8),
        "tiny-sd": ("sd", "cfg", 32, "epsilon", 8),
        "tiny-sdxl": ("sdxl", "cfg", from_folder.native_resolution, "epsilon", 8),
        # Guided classifier-free (its model_index.json's _guidance), though its transformer
        # has a guidance embedding; trained at 32 px (its _native_resolution).
        "fashion-flux": ("flux", "cfg", 32, "flow", 8),
    }[arch]
    assert (
        from_folder.family,
        from_folder.guidance,
        from_folder.native_resolution,
        from_folder.prediction_type,
        from_folder.size_multiple,
    ) == expected


def test_a_flux_model_without_guidance_embeds_takes_no_guidance(
    tiny_flux_dir: Path, tmp_path: Path
) -> None:
    """FLUX.1 [schnell]'s transformer config says guidance_embeds: false."""
    folder = tmp_path / "schnell-like"
    for part in ("model_index.json", "transformer/config.json", "vae/config.json"):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_flux_dir / part, folder / part)
    config = json.loads((folder / "transformer/config.json").read_text())
    (folder / "transformer/config.json").write_text(
        json.dumps({**config, "guidance_embeds": False})
    )
    info = describe_folder(folder, name="schnell", bits=8)
    assert info is not None and (info.family, info.guidance) == ("flux", "none")


def test_a_real_size_vae_gives_flux_its_1024_px(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """Four VAE blocks (FLUX.1's VAE, factor 8): 128 × 8 = 1024 px, sides multiples of 16."""
    folder = tmp_path / "flux-like"
    shutil.copytree(tiny_flux_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    vae = json.loads((folder / "vae/config.json").read_text())
    vae["block_out_channels"] = [128, 256, 512, 512]
    (folder / "vae/config.json").write_text(json.dumps(vae))
    info = describe_folder(folder, name="flux", bits=8)
    assert info is not None and (info.native_resolution, info.size_multiple) == (1024, 16)


def test_the_index_marks_a_flux_model_classifier_free(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """The key decides, whatever the transformer config says (the core's rule, tested there)."""
    folder = tmp_path / "cfg-flux"
    for part in ("model_index.json", "transformer/config.json", "vae/config.json"):
        (folder / part).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tiny_flux_dir / part, folder / part)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, GUIDANCE_KEY: "cfg"}))
    info = describe_folder(folder, name="cfg-flux", bits=4)
    assert info is not None and (info.family, info.guidance) == ("flux", "cfg")
    (folder / "model_index.json").write_text(json.dumps({**index, GUIDANCE_KEY: "other"}))
    info = describe_folder(folder, name="cfg-flux", bits=4)
    assert info is not None and info.guidance == "embedded"
