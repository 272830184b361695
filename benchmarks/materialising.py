"""Weight-materialising TuneQDM, for comparison only.

This reproduces the design of the paper's own code (docs/method.md explains why it is heavy):
every forward of every quantized layer rebuilds

    Ŵ = s_out ⊙ (q − z) ⊙ s_in

in float from the integer codes and calls ``F.linear`` / ``F.conv2d`` with it, so autograd
keeps weight-sized tensors per layer for the backward, and the whole batch uses the interval of
its first timestep. The library never does this (tuneqdm_core/layers.py); the benchmark needs it
as the baseline that the activation-side layers are measured against. The formula is the one
tests/core/oracle.py checks the library with; it is written again here because benchmarks do not
import the test suite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tuneqdm_core import Adapter, QuantConv2d, QuantLayer, quant_state


class MaterialisingScales:
    """The adapter and the interval every layer reads; the caller sets the interval per step."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.interval = 0

    def set_timesteps(self, timesteps: torch.Tensor) -> None:
        # The paper's code picks the expert of the batch from its first timestep.
        self.interval = self.adapter.config.interval_of(float(timesteps.reshape(-1)[0]))


class MaterialisingLayer(nn.Module):
    """Wraps a frozen :class:`QuantLayer` and runs it through a materialised ``Ŵ``."""

    def __init__(self, base_layer: QuantLayer, scales: MaterialisingScales) -> None:
        super().__init__()
        if isinstance(base_layer, QuantConv2d) and (
            base_layer.groups != 1 or base_layer.padding_mode != "zeros"
        ):
            raise NotImplementedError("grouped or non-zero-padded convs are not needed here")
        self.base_layer = base_layer
        self.scales = scales

    def weight(self) -> torch.Tensor:
        layer = self.base_layer
        s_out, s_in = self.scales.adapter.layer_scales(layer.index, self.scales.interval)
        q = layer.unpacked_codes().to(s_out.dtype).view(layer.weight_shape)
        ones = [1] * (q.ndim - 1)
        w = s_out.view(-1, *ones) * (q - layer.zero.view(-1, *ones))
        if s_in is None:
            return w
        return w * s_in.view(1, -1, *ones[1:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.base_layer
        if isinstance(layer, QuantConv2d):
            return F.conv2d(
                x, self.weight(), layer.bias, layer.stride, layer.padding, layer.dilation
            )
        return F.linear(x, self.weight(), layer.bias)


def materialise_(model: nn.Module, adapter: Adapter) -> MaterialisingScales:
    """Wrap every quantized layer of ``model`` in place; returns the shared interval holder."""
    scales = MaterialisingScales(adapter)
    for name, layer in quant_state(model).layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MaterialisingLayer(layer, scales))
    return scales
