"""Bytes of a quantized model and of its adapter files, measured on real tensors and files."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from tuneqdm_core.adapter import Adapter, AdapterConfig
from tuneqdm_core.model import quant_state
from tuneqdm_core.serialization import save_adapter

GIB = 1024**3
MB = 1000**2


@dataclass(frozen=True)
class ModelBytes:
    codes: int  # integer codes (4-bit packed two per byte)
    per_channel: int  # s0 and z of every output channel
    biases: int  # float biases of quantized layers
    other: int  # everything left in float: norms, embeddings that are not Linear/Conv2d

    @property
    def total(self) -> int:
        return self.codes + self.per_channel + self.biases + self.other


def float_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers as they are (call before quantizing for fp32)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def quantized_bytes(model: nn.Module) -> ModelBytes:
    state = quant_state(model)
    codes = per_channel = biases = 0
    quantized_tensors: set[int] = set()
    for _, layer in state.layers:
        codes += layer.codes.nbytes
        per_channel += layer.s0.nbytes + layer.zero.nbytes
        biases += 0 if layer.bias is None else layer.bias.nbytes
        quantized_tensors.update(id(t) for t in layer.buffers())
    other = sum(
        t.nbytes for t in (*model.parameters(), *model.buffers()) if id(t) not in quantized_tensors
    )
    return ModelBytes(codes, per_channel, biases, other)


def adapter_file_bytes(model: nn.Module, config: AdapterConfig) -> int:
    """Size on disk of a fresh adapter of ``config`` for ``model``."""
    with tempfile.TemporaryDirectory() as directory:
        path = save_adapter(Adapter.create(model, config), Path(directory) / "adapter.safetensors")
        return path.stat().st_size
