"""What TUNEQDM_MODEL may name: a single-file checkpoint serves the same base as its folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from app.settings import Settings
from tests.core.sd_checkpoint import pipeline_to_ldm
from worker.runtime import Runtime


def test_worker_loads_a_single_file_checkpoint(
    tiny_model_dir: Path, shared_runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "my-model.safetensors"
    save_file(pipeline_to_ldm(StableDiffusionPipeline.from_pretrained(tiny_model_dir)), checkpoint)
    monkeypatch.setenv("TUNEQDM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEQDM_MODEL", str(checkpoint))
    monkeypatch.setenv("TUNEQDM_SINGLE_FILE_CONFIG", str(tiny_model_dir))
    runtime = Runtime(Settings())
    base = runtime.base
    assert base.source == str(checkpoint)
    # Quantized once into the worker's cache folder, and the same base the folder gives.
    assert not base.from_cache
    assert len(list(runtime.settings.resolved_quant_cache_dir.glob("unet-*"))) == 1
    assert base.fingerprint == shared_runtime.base.fingerprint
