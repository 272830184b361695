"""Shared test helpers: perturbed adapters and the library-vs-oracle comparison."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from tests.core.oracle import oracle_mode
from tuneqdm_core import Adapter, AdapterConfig, route_adapters, routed


def perturbed_adapter(model: nn.Module, config: AdapterConfig, spread: float = 0.2) -> Adapter:
    """An adapter whose scales moved away from their initial values, in the model's dtype."""
    dtype = _float_dtype(model)
    adapter = Adapter.create(model, config).to(dtype)
    with torch.no_grad():
        for p in adapter.s_out:
            p.mul_(1 + spread * torch.randn_like(p))
        for p in adapter.s_in:
            p.add_(spread * torch.randn_like(p))
    return adapter


def _float_dtype(model: nn.Module) -> torch.dtype:
    for name, buffer in model.named_buffers():
        if name.endswith("s0"):
            return buffer.dtype
    raise ValueError("model has no quantized layer")


def grads(adapters: Sequence[Adapter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for a in adapters for p in a.parameters()]


def run_both(
    model: nn.Module,
    call: Callable[[], torch.Tensor],
    adapters: Sequence[Adapter],
    timesteps: Sequence[float],
    slots: Sequence[int],
) -> tuple[
    tuple[torch.Tensor, list[torch.Tensor | None]], tuple[torch.Tensor, list[torch.Tensor | None]]
]:
    """(output, scale grads) of the library and of the oracle for the same batch."""
    results = []
    for use_oracle in (False, True):
        for adapter in adapters:
            adapter.zero_grad(set_to_none=True)
        route = route_adapters(adapters, torch.tensor(timesteps), torch.tensor(slots))
        with routed(model, route):
            if use_oracle:
                with oracle_mode(model, adapters, timesteps, slots):
                    y = call()
            else:
                y = call()
            weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
            (y * weights).sum().backward()
        results.append((y.detach(), grads(adapters)))
    return results[0], results[1]


def assert_close_all(
    got: Sequence[torch.Tensor | None], want: Sequence[torch.Tensor | None], rtol: float
) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None), "a scale got a gradient in one computation only"
        if g is not None and w is not None:
            err = (g - w).abs().max() / w.abs().max().clamp_min(1e-30)
            assert err <= rtol, f"relative error {err:.3g} > {rtol}"
