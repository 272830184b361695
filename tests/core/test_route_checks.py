"""A route is checked against the model it is applied to: scales made for another quantized
base, or a call at other timesteps than the route was built for, are refused with an error
that says what differs (both gave wrong output without any error before)."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.core.helpers import perturbed_adapter
from tuneqdm_core import AdapterConfig, QuantConfig, quant_state, quantize_, routed
from tuneqdm_core.configs import build_unet, example_inputs
from tuneqdm_core.routing import ScaleBank, route_adapters


def _unet(seed: int, bits: int = 4) -> UNet2DConditionModel:
    """The tiny UNet; another ``seed`` gives the same layers with other weights."""
    unet = build_unet("tiny-sd1")
    if seed:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    quantize_(unet, QuantConfig(bits=bits))  # type: ignore[arg-type]
    return unet.eval()


def test_an_adapter_of_another_base_with_the_same_layout_is_refused() -> None:
    mine, other = _unet(0), _unet(1)
    adapter = perturbed_adapter(other, AdapterConfig(intervals=2))
    t = torch.tensor([100, 900])
    route = route_adapters([adapter], t)
    with (
        pytest.raises(ValueError, match="same layer layout, but other quantized weights"),
        routed(mine, route),
    ):
        pass
    # Another bit width is named as such.
    eight = _unet(0, bits=8)
    with pytest.raises(ValueError, match="4-bit against 8-bit"), routed(eight, route):
        pass
    # On its own base the same route runs.
    with torch.no_grad(), routed(other, route):
        other(**example_inputs(other, 2, t))


def test_adapters_of_two_bases_cannot_share_a_route() -> None:
    a = perturbed_adapter(_unet(0), AdapterConfig(intervals=2))
    b = perturbed_adapter(_unet(1), AdapterConfig(intervals=2))
    with pytest.raises(ValueError, match="adapter 1 was made for base"):
        route_adapters([a, b], torch.tensor([100, 900]), torch.tensor([0, 1]))


def test_a_bank_route_is_checked_against_the_model_too() -> None:
    mine, other = _unet(0), _unet(1)
    bank = ScaleBank(other, slots=2)
    route = bank.route(torch.tensor([100, 900]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="other quantized weights"), routed(mine, route):
        pass


@pytest.mark.parametrize("kind", ["adapters", "bank"])
def test_a_call_at_other_timesteps_than_the_route_is_refused(kind: str) -> None:
    unet = _unet(0)
    adapter = perturbed_adapter(unet, AdapterConfig(intervals=2))
    built_for = torch.tensor([900, 900])
    if kind == "adapters":
        route = route_adapters([adapter], built_for)
    else:
        bank = ScaleBank(unet, slots=2)
        bank.load(1, adapter)
        route = bank.route(built_for, [1, 1])
    with torch.no_grad(), routed(unet, route):
        # The route would serve interval 1 to samples at t = 100 (interval 0).
        with pytest.raises(ValueError, match=r"built for timesteps \[900, 900\].*called at \[100"):
            unet(**example_inputs(unet, 2, torch.tensor([100, 100])))
        # By position as well as by keyword.
        inputs = example_inputs(unet, 2, torch.tensor([100, 100]))
        with pytest.raises(ValueError, match="called at"):
            unet(inputs.pop("sample"), inputs.pop("timestep"), **inputs)
        # The timesteps it was built for (a tensor, one number for the batch, or the same
        # values in another dtype) run.
        for t in (built_for, torch.tensor(900), torch.tensor([900.0, 900.0])):
            unet(**{**example_inputs(unet, 2, built_for), "timestep": t})


def test_a_model_called_on_another_timestep_scale_is_checked_through_call_timesteps() -> None:
    """A model that is not one of diffusers' UNets may take timesteps on another scale (FLUX's
    transformer gets t/1000): it is checked once it says how to read them."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model = Scaled()
    quantize_(model, QuantConfig(bits=8))
    adapter = perturbed_adapter(model, AdapterConfig(intervals=2))
    route = route_adapters([adapter], torch.tensor([900.0, 900.0]))
    x = torch.randn(2, 4)
    with torch.no_grad(), routed(model, route):
        model(x, torch.tensor([0.9, 0.9]))  # not read: its scale is unknown
        quant_state(model).call_timesteps = lambda args, kwargs: args[1] * 1000
        model(x, torch.tensor([0.9, 0.9]))
        with pytest.raises(ValueError, match="called at"):
            model(x, torch.tensor([0.1, 0.1]))
