"""The reference: TuneQDM's weight built exactly as the paper writes it.

``Ŵ[o, i, …] = s_out[o] · (q − z)[o, i, …] · s_in[i]`` (docs/method.md, "MCSU"), then an ordinary
``F.linear`` / ``F.conv2d``. It materialises the weight on purpose; the library must never.
Per-sample routing is recomputed here from the raw timesteps with the paper's rule
``k = ⌊t·n/T⌋`` written as a loop over interval boundaries, not with the library's code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tuneqdm_core import Adapter, QuantConv2d, QuantLayer, quant_state


def materialized_weight(
    layer: QuantLayer, s_out: torch.Tensor, s_in: torch.Tensor | None
) -> torch.Tensor:
    dtype = s_out.dtype
    q = layer.unpacked_codes().to(dtype).view(layer.weight_shape)
    z = layer.zero.to(dtype).view(-1, *([1] * (q.ndim - 1)))
    w = s_out.view(-1, *([1] * (q.ndim - 1))) * (q - z)
    if s_in is None:
        return w
    if isinstance(layer, QuantConv2d):
        # Output channel o belongs to group o // (O/g) and sees input channels of that group.
        groups, out_per_group = layer.groups, layer.out_channels // layer.groups
        per_group = s_in.view(groups, -1)  # [g, I/g]
        s_in_w = per_group.repeat_interleave(out_per_group, dim=0)  # [O, I/g]
        return w * s_in_w[:, :, None, None]
    return w * s_in[None, :]


def oracle_layer(
    layer: QuantLayer, x: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor | None
) -> torch.Tensor:
    w = materialized_weight(layer, s_out, s_in)
    bias = None if layer.bias is None else layer.bias.to(w.dtype)
    if isinstance(layer, QuantConv2d):
        if layer.padding_mode != "zeros":
            x = F.pad(x, layer.explicit_pad, mode=layer.padding_mode)
        return F.conv2d(x, w, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, w, bias)


def paper_interval(t: float, intervals: int, num_train_timesteps: int = 1000) -> int:
    width = num_train_timesteps / intervals
    for k in range(intervals):
        if k * width <= t < (k + 1) * width:
            return k
    raise ValueError(f"timestep {t} outside [0, {num_train_timesteps})")


@contextmanager
def oracle_mode(
    model: nn.Module, adapters: Sequence[Adapter], timesteps: Sequence[float], slots: Sequence[int]
) -> Iterator[None]:
    """Run every quantized layer of ``model`` through the oracle, sample by sample."""
    state = quant_state(model)
    saved: list[tuple[QuantLayer, Callable[..., torch.Tensor]]] = []

    def make_forward(layer: QuantLayer, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:
            outputs = []
            for b in range(x.shape[0]):
                adapter = adapters[slots[b]]
                k = paper_interval(timesteps[b], adapter.config.intervals)
                s_out, s_in = adapter.layer_scales(index, k)
                outputs.append(oracle_layer(layer, x[b : b + 1], s_out, s_in))
            return torch.cat(outputs)

        return forward

    for index, (_, layer) in enumerate(state.layers):
        saved.append((layer, layer.forward))
        layer.forward = make_forward(layer, index)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        for layer, forward in saved:
            layer.forward = forward  # type: ignore[method-assign]
