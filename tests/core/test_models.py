"""Quantizing whole diffusers UNets of the SD 1.x, 2.x and SDXL shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn

from tests.core.helpers import assert_close_all, perturbed_adapter, run_both
from tuneqdm_core import (
    AdapterConfig,
    QuantConfig,
    QuantLayer,
    ScaleBank,
    quant,
    quantize_,
    route_adapters,
    set_route,
)
from tuneqdm_core.configs import UNET_CONFIGS, build_unet, example_inputs


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sd2", "tiny-sdxl"])
@pytest.mark.parametrize(("bits", "min_sqnr_db"), [(8, 30.0), (4, 10.0)])
def test_quantized_unet_tracks_float_unet(arch: str, bits: int, min_sqnr_db: float) -> None:
    unet = build_unet(arch)
    float_linear_conv = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in unet.modules())
    inputs = example_inputs(unet, 2, torch.tensor([10, 900]))
    with torch.no_grad():
        want = unet(**inputs).sample
    state = quantize_(unet, QuantConfig(bits=bits))  # type: ignore[arg-type]
    assert len(state.layers) == float_linear_conv
    assert not any(isinstance(m, nn.Linear | nn.Conv2d) for m in unet.modules())
    assert not any(p.requires_grad for p in unet.parameters())
    with torch.no_grad():
        got = unet(**inputs).sample
    assert quant.sqnr_db(want, got) > min_sqnr_db


def test_sd1_architecture_layout_matches_the_public_config() -> None:
    # Built on the meta device: shapes only, no 3.4 GB of weights.
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd1"])
    layers = [m for m in unet.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964
    assert len(layers) == 282 and sum(isinstance(m, nn.Conv2d) for m in layers) == 98
    assert sum(m.weight.shape[0] for m in layers) == 318_404
    assert sum(m.weight.shape[1] * getattr(m, "groups", 1) for m in layers) == 294_340


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sdxl"])
def test_whole_unet_matches_oracle_on_a_mixed_batch(arch: str) -> None:
    unet = build_unet(arch)
    quantize_(unet, QuantConfig(bits=4))
    unet.double()
    adapters = [
        perturbed_adapter(unet, AdapterConfig(method="tuneqdm", intervals=2), spread=0.05),
        perturbed_adapter(unet, AdapterConfig(method="peqa", intervals=1), spread=0.05),
    ]
    timesteps, slots = [5.0, 700.0, 999.0, 250.0], [0, 0, 1, 1]
    inputs = example_inputs(unet, 4, torch.tensor(timesteps))
    inputs = {k: _double(v) for k, v in inputs.items()}

    def call() -> torch.Tensor:
        return unet(**inputs).sample

    (y, g), (y_ref, g_ref) = run_both(unet, call, adapters, timesteps, slots)
    assert_close_all([y], [y_ref], 1e-9)
    assert_close_all(g, g_ref, 1e-8)


def _double(value: object) -> object:
    if isinstance(value, dict):
        return {k: _double(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    return value


def test_bank_serves_the_same_images_as_the_adapters_themselves() -> None:
    unet = build_unet("tiny-sd1")
    quantize_(unet, QuantConfig(bits=8))
    adapters = [
        perturbed_adapter(unet, AdapterConfig(method="tuneqdm", intervals=2)),
        perturbed_adapter(unet, AdapterConfig(method="peqa", intervals=1)),
        perturbed_adapter(unet, AdapterConfig(method="tuneqdm", intervals=4)),
    ]
    bank = ScaleBank(unet, slots=4, max_intervals=4)
    for slot, adapter in enumerate(adapters, start=1):
        bank.load(slot, adapter)
    timesteps = torch.tensor([3, 640, 999, 260, 510, 777])
    slots = torch.tensor([0, 1, 2, 3, 3, 1])
    inputs = example_inputs(unet, 6, timesteps)
    with torch.no_grad():
        set_route(unet, bank.route(timesteps, slots))
        served = unet(**inputs).sample
        set_route(unet, None)
        base = unet(**inputs).sample
        one_by_one = []
        for b in range(6):
            single = {
                k: v[b : b + 1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()
            }
            single["added_cond_kwargs"] = None
            if slots[b] == 0:
                set_route(unet, None)
            else:
                set_route(unet, route_adapters([adapters[int(slots[b]) - 1]], timesteps[b]))
            one_by_one.append(unet(**single).sample)
        set_route(unet, None)
    assert torch.allclose(served, torch.cat(one_by_one), rtol=1e-4, atol=1e-5)
    # Slot 0 is the plain base. In a mixed batch it takes the per-sample path, whose float32
    # rounding differs from the plain path's by up to ~1.6e-6 with two threads (outputs ~1).
    assert torch.allclose(served[0], base[0], rtol=1e-4, atol=1e-5)
    bank.reset(1)
    with torch.no_grad():
        set_route(unet, bank.route(timesteps, torch.ones(6, dtype=torch.long)))
        # A reset slot is the base up to rounding: the routed path applies bias and scales in
        # another order than the bare one (seen 1e-6 apart once in a full run).
        assert torch.allclose(unet(**inputs).sample, base, rtol=1e-4, atol=1e-5)


def test_quantize_rejects_misuse() -> None:
    unet = build_unet("tiny-sd1")
    quantize_(unet, QuantConfig(bits=8))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(unet)
    with pytest.raises(ValueError, match=r"no nn\.Linear or nn\.Conv2d"):
        quantize_(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantConfig(bits=2)  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError, match="padding='same'"):
        quantize_(nn.Sequential(nn.Conv2d(2, 2, 3, padding="same")))
    assert all(isinstance(layer, QuantLayer) for _, layer in unet.tuneqdm_state.layers)
