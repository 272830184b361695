"""``routed()``: the route is set for a block and always cleared; with gradient checkpointing it
cannot be replaced (or cleared) under a backward that still needs it."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.core.helpers import perturbed_adapter
from tuneqdm_core import Adapter, AdapterConfig, QuantConfig, quant_state, quantize_, routed
from tuneqdm_core.configs import build_unet, example_inputs
from tuneqdm_core.routing import route_adapters, set_route

TIMESTEPS = torch.tensor([100, 900])


def _unet(checkpointing: bool) -> UNet2DConditionModel:
    unet = build_unet("tiny-sd1")
    quantize_(unet, QuantConfig(bits=4))
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def _loss(unet: UNet2DConditionModel) -> torch.Tensor:
    torch.manual_seed(1)
    inputs = example_inputs(unet, 2, TIMESTEPS)
    return unet(**inputs).sample.pow(2).mean()


def _adapter(unet: UNet2DConditionModel) -> Adapter:
    torch.manual_seed(3)
    return perturbed_adapter(unet, AdapterConfig(intervals=2)).requires_grad_(True)


def test_routed_clears_the_route_even_on_an_exception() -> None:
    unet = _unet(checkpointing=False)
    route = route_adapters([_adapter(unet)], TIMESTEPS)
    with pytest.raises(KeyError), routed(unet, route):
        assert quant_state(unet).route is route
        raise KeyError("boom")
    assert quant_state(unet).route is None


def test_checkpointed_gradients_through_routed_match_plain_ones() -> None:
    grads = []
    for checkpointing in (False, True):
        unet = _unet(checkpointing)
        assert unet.is_gradient_checkpointing is checkpointing
        adapter = _adapter(unet)
        with routed(unet, route_adapters([adapter], TIMESTEPS)):
            _loss(unet).backward()
        grads.append([p.grad for p in adapter.parameters() if p.grad is not None])
    plain, checkpointed = grads
    assert len(plain) == len(checkpointed) == 4  # s_out and s_in of both intervals
    for a, b in zip(plain, checkpointed, strict=True):
        assert a is not None and b is not None
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-10)


def test_a_route_a_backward_still_needs_is_not_replaced() -> None:
    unet = _unet(checkpointing=True)
    first, second = _adapter(unet), _adapter(unet)
    with routed(unet, route_adapters([first], TIMESTEPS)):
        loss = _loss(unet)
        with pytest.raises(RuntimeError, match="backward pass still needs"):
            set_route(unet, route_adapters([second], TIMESTEPS))
        with (
            pytest.raises(RuntimeError, match="backward pass still needs"),
            routed(unet, route_adapters([second], TIMESTEPS)),
        ):
            pass
        loss.backward()
        # After the backward the route may change again.
        with routed(unet, route_adapters([second], TIMESTEPS)):
            _loss(unet).backward()
    assert all(p.grad is not None for p in second.parameters())


def test_a_backward_after_the_route_was_cleared_raises() -> None:
    unet = _unet(checkpointing=True)
    adapter = _adapter(unet)
    with routed(unet, route_adapters([adapter], TIMESTEPS)):
        loss = _loss(unet)
    assert quant_state(unet).route is None
    # The checkpointed layers would recompute on the plain base: refused, not wrong gradients.
    with pytest.raises(RuntimeError, match="route its forward read was cleared"):
        loss.backward()
    with pytest.raises(RuntimeError, match="backward pass still needs"):
        set_route(unet, route_adapters([adapter], TIMESTEPS))
    del loss  # the graph is gone: nothing needs the old route any more
    with routed(unet, route_adapters([adapter], TIMESTEPS)):
        _loss(unet).backward()


def test_without_checkpointing_nothing_is_tracked() -> None:
    unet = _unet(checkpointing=False)
    first, second = _adapter(unet), _adapter(unet)
    with routed(unet, route_adapters([first], TIMESTEPS)):
        loss = _loss(unet)
        set_route(unet, route_adapters([second], TIMESTEPS))  # nothing recomputes: allowed
    loss.backward()
    assert all(p.grad is not None for p in first.parameters())
