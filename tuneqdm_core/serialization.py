"""Adapter files: one safetensors file holding only the scales, with JSON metadata.

Tensors are keyed by module path like PEFT's: ``{layer}.s_out.{k}`` and ``{layer}.s_in.{k}`` for
interval ``k``. The safetensors header's metadata holds one entry, ``tuneqdm``, a JSON object:
format version, method, bits, intervals and their timestep boundaries, the layers (name, kind,
out and in channels) and the fingerprint of the quantized base. One file keeps an adapter
atomic to write, store and download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tuneqdm_core.adapter import Adapter, AdapterConfig
from tuneqdm_core.files import write_atomic
from tuneqdm_core.model import LayerSpec, Layout, quant_state

FORMAT_VERSION = 1
METADATA_KEY = "tuneqdm"
# Past this many mismatches an error message lists the count, not every name.
_SHOWN = 5


class AdapterFileError(ValueError):
    """An adapter file that is unreadable, malformed, or made for another base."""


def adapter_metadata(adapter: Adapter, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    config = adapter.config
    return {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "bits": adapter.bits,
        "intervals": config.intervals,
        "boundaries": config.boundaries(),
        "num_train_timesteps": config.num_train_timesteps,
        "init_sigma": config.init_sigma,
        "base_fingerprint": adapter.base_fingerprint,
        "layers": [[s.name, s.kind, s.out_channels, s.in_channels] for s in adapter.layout.layers],
        "extra": extra or {},
    }


def adapter_tensors(adapter: Adapter) -> dict[str, torch.Tensor]:
    tensors = {}
    for k in range(adapter.config.intervals):
        for index, spec in enumerate(adapter.layout.layers):
            s_out, s_in = adapter.layer_scales(index, k)
            tensors[f"{spec.name}.s_out.{k}"] = s_out.detach().cpu().contiguous()
            if s_in is not None:
                tensors[f"{spec.name}.s_in.{k}"] = s_in.detach().cpu().contiguous()
    return tensors


def save_adapter(
    adapter: Adapter, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``adapter`` to ``path`` atomically (a temporary file, then a rename), so a crash
    never leaves a half-written adapter. ``extra`` is free JSON (tokens, prompts, job id)."""
    path = Path(path)
    metadata = {METADATA_KEY: json.dumps(adapter_metadata(adapter, extra))}
    tensors = adapter_tensors(adapter)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON metadata of an adapter file, checked for the fields loading needs."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except FileNotFoundError:
        raise
    except Exception as error:  # safetensors raises its own error types for bad headers
        raise AdapterFileError(f"{path}: not a readable safetensors file ({error})") from error
    if raw is None:
        raise AdapterFileError(f"{path}: no '{METADATA_KEY}' metadata; not a TuneQDM adapter file")
    try:
        metadata = json.loads(raw)
        version = metadata["format_version"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise AdapterFileError(f"{path}: malformed adapter metadata ({error})") from error
    if version != FORMAT_VERSION:
        raise AdapterFileError(
            f"{path}: adapter format version {version}; this version reads {FORMAT_VERSION}"
        )
    return dict(metadata)


def _names(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _check_base(path: Path, metadata: dict[str, Any], layout: Layout, model: nn.Module) -> None:
    state = quant_state(model)
    if metadata["bits"] != state.config.bits:
        raise AdapterFileError(
            f"{path}: adapter made for a {metadata['bits']}-bit base, "
            f"model is {state.config.bits}-bit"
        )
    if layout != state.layout:
        file_layers = {s.name: s for s in layout.layers}
        model_layers = {s.name: s for s in state.layout.layers}
        problems = [f"missing in model: {n}" for n in file_layers if n not in model_layers]
        problems += [f"not in adapter: {n}" for n in model_layers if n not in file_layers]
        problems += [
            f"{n}: adapter {file_layers[n].out_channels}x{file_layers[n].in_channels}, "
            f"model {model_layers[n].out_channels}x{model_layers[n].in_channels}"
            for n in file_layers
            if n in model_layers and file_layers[n] != model_layers[n]
        ]
        detail = _names(problems) or "same layers in another order"
        raise AdapterFileError(f"{path}: adapter layers do not match the model's ({detail})")
    if metadata["base_fingerprint"] != state.fingerprint:
        raise AdapterFileError(
            f"{path}: adapter made for another quantized base (fingerprint "
            f"{metadata['base_fingerprint'][:12]}…, model {state.fingerprint[:12]}…); "
            "fine-tune it again on this base"
        )


def load_adapter(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    device: torch.device | str | None = None,
) -> Adapter:
    """Read an adapter file. With ``model``, also check that it was made for that model's
    quantized base (bits, layers, fingerprint). The result is bit-exact to what was saved."""
    path = Path(path)
    metadata = read_metadata(path)
    try:
        config = AdapterConfig(
            method=metadata["method"],
            intervals=metadata["intervals"],
            init_sigma=metadata.get("init_sigma", 0.0),
            num_train_timesteps=metadata["num_train_timesteps"],
        )
        layout = Layout(tuple(LayerSpec(n, k, int(o), int(i)) for n, k, o, i in metadata["layers"]))
    except (KeyError, TypeError, ValueError) as error:
        raise AdapterFileError(f"{path}: malformed adapter metadata ({error})") from error
    if model is not None:
        _check_base(path, metadata, layout, model)

    expected: dict[str, int] = {}
    for k in range(config.intervals):
        for spec in layout.layers:
            expected[f"{spec.name}.s_out.{k}"] = spec.out_channels
            if config.has_s_in:
                expected[f"{spec.name}.s_in.{k}"] = spec.in_channels
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        keys = list(handle.keys())
        missing = [key for key in expected if key not in keys]
        extra = [key for key in keys if key not in expected]
        if missing or extra:
            parts = [f"missing {_names(missing)}"] if missing else []
            parts += [f"unexpected {_names(extra)}"] if extra else []
            raise AdapterFileError(f"{path}: tensors do not match the metadata: {'; '.join(parts)}")
        tensors = {key: handle.get_tensor(key) for key in keys}
    misshaped = [
        f"{key} has shape {tuple(t.shape)}, expected ({expected[key]},)"
        for key, t in tensors.items()
        if tuple(t.shape) != (expected[key],) or t.dtype != torch.float32
    ]
    if misshaped:
        raise AdapterFileError(f"{path}: {_names(misshaped)} (float32 vectors expected)")

    def flat(kind: str, k: int) -> torch.Tensor:
        return torch.cat([tensors[f"{spec.name}.{kind}.{k}"] for spec in layout.layers]).to(device)

    intervals = range(config.intervals)
    s_out = [flat("s_out", k) for k in intervals]
    s_in = [flat("s_in", k) for k in intervals] if config.has_s_in else None
    return Adapter(config, layout, s_out, s_in, metadata["base_fingerprint"], metadata["bits"])
