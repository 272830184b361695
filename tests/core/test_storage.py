"""The packed and resident storage modes compute the same function; resident never dequantizes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.core.helpers import assert_close_all, grads, perturbed_adapter
from tuneqdm_core import Adapter, AdapterConfig, QuantConfig, quantize_, route_adapters, routed
from tuneqdm_core.base import load_base
from tuneqdm_core.configs import example_inputs
from tuneqdm_core.layers import QuantLayer
from tuneqdm_core.model import quant_state, set_storage_mode


def _stack(bits: int) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4),
        nn.Conv2d(16, 15, 3, padding=1, padding_mode="reflect"),
        nn.Flatten(),
        nn.Linear(15 * 4 * 4, 33),
    )
    quantize_(model, QuantConfig(bits=bits))  # type: ignore[arg-type]
    return model.double()


def _run(
    model: nn.Module, call: Callable[[], torch.Tensor], adapters: Sequence[Adapter]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Output and scale gradients of a mixed batch (two adapters, several timesteps)."""
    for adapter in adapters:
        adapter.zero_grad(set_to_none=True)
    timesteps, slots = [5.0, 900.0, 400.0, 600.0], [0, 1, 1, 0]
    with routed(model, route_adapters(adapters, torch.tensor(timesteps), torch.tensor(slots))):
        y = call()
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        (y * weights).sum().backward()
    return y.detach(), grads(adapters)


def _refuse(*_: object, **__: object) -> torch.Tensor:
    """Stands in for QuantLayer.dequantize where the resident mode must never need it."""
    raise AssertionError("a layer was dequantized")


@pytest.mark.parametrize("bits", [4, 8])
def test_resident_equals_packed_in_float64(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _stack(bits)
    adapters = [
        perturbed_adapter(model, AdapterConfig(intervals=2)),
        perturbed_adapter(model, AdapterConfig(method="peqa", intervals=1)),
    ]
    x = torch.randn(4, 8, 8, 8, dtype=torch.float64)
    packed = _run(model, lambda: model(x), adapters)
    bare_packed = model(x).detach()
    state = set_storage_mode(model, "resident", torch.float64)
    assert state.storage_mode == "resident"
    with monkeypatch.context() as patch:
        patch.setattr(QuantLayer, "dequantize", _refuse)
        resident = _run(model, lambda: model(x), adapters)
        bare_resident = model(x).detach()
    assert_close_all([resident[0], bare_resident], [packed[0], bare_packed], 1e-10)
    assert_close_all(resident[1], packed[1], 1e-10)
    assert all(g is not None for g in resident[1])
    # Back to packed: the copies are dropped and the codes serve again.
    set_storage_mode(model, "packed")
    assert all(layer.resident is None for _, layer in state.layers)
    assert_close_all([_run(model, lambda: model(x), adapters)[0]], [packed[0]], 1e-10)


def test_resident_copy_serves_only_its_own_dtype() -> None:
    """A pass at another precision than the copy's dequantizes from the codes: a bf16 pass
    over an fp32-resident model gives exactly what the packed model gives."""
    model = _stack(4).float()
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = model(x)
        set_storage_mode(model, "resident", torch.float32)
        resident = model(x)
    assert torch.equal(packed, resident)
    with pytest.raises(ValueError, match="storage mode"):
        set_storage_mode(model, "mmap")  # type: ignore[arg-type]


def test_resident_unet_trains_like_packed(
    tiny_model_dir: Path, quant_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tiny UNet, fp32, through load_base(storage_mode=...): same outputs and scale
    gradients, and the resident base runs forward and backward without dequantizing."""
    packed = load_base(tiny_model_dir, cache_dir=quant_cache)
    resident = load_base(tiny_model_dir, cache_dir=quant_cache, storage_mode="resident")
    assert (packed.storage_mode, resident.storage_mode) == ("packed", "resident")
    assert resident.fingerprint == packed.fingerprint
    layers = quant_state(resident.unet).layers
    assert all(layer.resident is not None for _, layer in layers)
    assert all(layer.resident.dtype == torch.float32 for _, layer in layers)  # type: ignore[union-attr]
    inputs = example_inputs(packed.unet, 4, torch.tensor([5, 900, 400, 600]))
    adapter = perturbed_adapter(packed.unet, AdapterConfig(intervals=2))
    other = perturbed_adapter(packed.unet, AdapterConfig(intervals=2))
    want = _run(packed.unet, lambda: packed.unet(**inputs).sample, [adapter, other])
    with monkeypatch.context() as patch:
        patch.setattr(QuantLayer, "dequantize", _refuse)
        got = _run(resident.unet, lambda: resident.unet(**inputs).sample, [adapter, other])
    assert_close_all([got[0]], [want[0]], 1e-6)
    assert_close_all(got[1], want[1], 1e-5)
