"""Adapter files: bit-exact round trip and clear errors for anything that does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tests.core.helpers import perturbed_adapter
from tuneqdm_core import (
    AdapterConfig,
    AdapterFileError,
    QuantConfig,
    load_adapter,
    quantize_,
    read_metadata,
    save_adapter,
)
from tuneqdm_core.configs import build_unet


def _model(bits: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    quantize_(model, QuantConfig(bits=bits))  # type: ignore[arg-type]
    return model


@pytest.mark.parametrize(
    ("method", "intervals"), [("tuneqdm", 1), ("tuneqdm", 2), ("tuneqdm", 4), ("peqa", 1)]
)
def test_save_load_is_bit_exact(tmp_path: Path, method: str, intervals: int) -> None:
    unet = build_unet("tiny-sd1")
    quantize_(unet, QuantConfig(bits=4))
    adapter = perturbed_adapter(unet, AdapterConfig(method=method, intervals=intervals))  # type: ignore[arg-type]
    path = save_adapter(adapter, tmp_path / "a.safetensors", extra={"tokens": ["sks"]})
    loaded = load_adapter(path, unet)
    assert loaded.config == adapter.config and loaded.layout == adapter.layout
    for a, b in zip(adapter.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())
    metadata = read_metadata(path)
    assert metadata["method"] == method and metadata["bits"] == 4
    assert metadata["intervals"] == intervals and len(metadata["boundaries"]) == intervals
    assert metadata["extra"] == {"tokens": ["sks"]}
    assert metadata["base_fingerprint"] == unet.tuneqdm_state.fingerprint
    assert [tmp_path / "a.safetensors"] == list(tmp_path.iterdir())  # no temporary file left


def test_only_scales_are_saved(tmp_path: Path) -> None:
    model = _model()
    adapter = perturbed_adapter(model, AdapterConfig(intervals=2))
    tensors = load_file(save_adapter(adapter, tmp_path / "a.safetensors"))
    assert sorted(tensors) == sorted(
        f"{layer}.{kind}.{k}" for layer in ("0", "2") for kind in ("s_out", "s_in") for k in (0, 1)
    )
    assert sum(t.numel() for t in tensors.values()) == adapter.num_values()


def test_another_base_is_refused(tmp_path: Path) -> None:
    path = save_adapter(perturbed_adapter(_model(), AdapterConfig()), tmp_path / "a.safetensors")
    with pytest.raises(AdapterFileError, match="another quantized base"):
        load_adapter(path, _model(seed=1))
    with pytest.raises(AdapterFileError, match="4-bit base, model is 8-bit"):
        load_adapter(path, _model(bits=8))
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 6))
    quantize_(other, QuantConfig(bits=4))
    with pytest.raises(AdapterFileError, match=r"2: adapter 5x128, model 6x128"):
        load_adapter(path, other)


def _rewrite(
    path: Path, change: dict[str, torch.Tensor | None], metadata: dict | None = None
) -> Path:
    tensors = load_file(path)
    for key, value in change.items():
        if value is None:
            tensors.pop(key)
        else:
            tensors[key] = value
    meta = {"tuneqdm": json.dumps(metadata or read_metadata(path))}
    out = path.with_name("bad.safetensors")
    save_file(tensors, out, metadata=meta)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"0.s_in.1": None}, r"missing 0.s_in.1"),
        ({"0.lora_A": torch.zeros(2)}, r"unexpected 0.lora_A"),
        ({"2.s_out.0": torch.ones(4)}, r"2.s_out.0 has shape \(4,\), expected \(5,\)"),
        ({"2.s_out.0": torch.ones(5, dtype=torch.float16)}, r"float32 vectors expected"),
    ],
)
def test_malformed_tensors_are_named(tmp_path: Path, change: dict, message: str) -> None:
    model = _model()
    path = save_adapter(
        perturbed_adapter(model, AdapterConfig(intervals=2)), tmp_path / "a.safetensors"
    )
    with pytest.raises(AdapterFileError, match=message):
        load_adapter(_rewrite(path, change), model)


def test_unreadable_files_say_what_is_wrong(tmp_path: Path) -> None:
    model = _model()
    path = save_adapter(perturbed_adapter(model, AdapterConfig()), tmp_path / "a.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFileError, match="not a readable safetensors file"):
        load_adapter(junk)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, bare)
    with pytest.raises(AdapterFileError, match="not a TuneQDM adapter file"):
        load_adapter(bare)
    newer = {**read_metadata(path), "format_version": 99}
    with pytest.raises(AdapterFileError, match="format version 99"):
        load_adapter(_rewrite(path, {}, newer))
    broken = {**read_metadata(path), "method": "lora"}
    with pytest.raises(AdapterFileError, match="malformed adapter metadata"):
        load_adapter(_rewrite(path, {}, broken))
    with pytest.raises(FileNotFoundError):
        load_adapter(tmp_path / "missing.safetensors")
