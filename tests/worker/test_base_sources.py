"""What the worker loads: a single-file TUNEQDM_MODEL serves the same base as its folder;
TUNEQDM_STORAGE_MODE picks how the base holds its weights and is reported in the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from sqlalchemy.orm import Session, sessionmaker

from app.models import ServedBase
from app.settings import Settings
from tuneqdm_core.ldm_layout import pipeline_to_ldm
from tuneqdm_core.model import quant_state
from worker.bases import Registrar
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


def test_worker_storage_mode_setting_and_registry_row(
    tiny_model_dir: Path,
    quant_cache: Path,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TUNEQDM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEQDM_MODEL", str(tiny_model_dir))
    monkeypatch.setenv("TUNEQDM_QUANT_CACHE_DIR", str(quant_cache))
    monkeypatch.setenv("TUNEQDM_STORAGE_MODE", "resident")
    settings = Settings()
    base = Runtime(settings).base
    assert base.storage_mode == "resident"
    assert all(layer.resident is not None for _, layer in quant_state(base.unet).layers)
    # GET /v1/bases reads the row the worker registers once the model is loaded.
    Registrar(settings, sessions).on_load(base)
    with sessions() as session:
        row = session.get(ServedBase, settings.base_model)
        assert row is not None
        assert (row.storage_mode, row.fingerprint) == ("resident", base.fingerprint)
    monkeypatch.setenv("TUNEQDM_STORAGE_MODE", "mmap")
    with pytest.raises(ValueError, match="packed"):
        Settings()


def test_worker_loads_a_flux_transformer_file_with_its_config(
    tiny_flux_dir: Path,
    tmp_path: Path,
    sessions: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """TUNEQDM_MODEL = one FLUX transformer file in the original layout, with
    TUNEQDM_SINGLE_FILE_CONFIG the folder the rest of the pipeline comes from: a flux base,
    registered as one."""
    from diffusers import FluxPipeline

    from tests.core.dit_layout import flux_to_original

    transformer = FluxPipeline.from_pretrained(tiny_flux_dir).transformer
    checkpoint = tmp_path / "flux1-tiny.safetensors"
    save_file(flux_to_original(transformer.state_dict()), checkpoint)
    monkeypatch.setenv("TUNEQDM_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TUNEQDM_MODEL", str(checkpoint))
    monkeypatch.setenv("TUNEQDM_SINGLE_FILE_CONFIG", str(tiny_flux_dir))
    settings = Settings()
    base = Runtime(settings).base
    assert base.source == str(checkpoint) and base.family is not None
    assert base.family.name == "flux"
    assert len(list(settings.resolved_quant_cache_dir.glob("transformer-*"))) == 1
    Registrar(settings, sessions).on_load(base)
    with sessions() as session:
        row = session.get(ServedBase, settings.base_model)
        assert row is not None and row.family == "flux"
