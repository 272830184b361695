"""The uniform fast path (every sample reads one scale row, nothing needs a gradient) against
the per-sample path and the paper's materialised weight (tests/core/oracle.py).

Each case runs with inputs small and large enough that ``s_in`` and the output scale land on the
activation side and on the weight side (tuneqdm_core/layers.py picks the smaller). Bounds as in
test_layers.py: float64 ≤ 1e-10 relative, float32 ≤ 2e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.core.helpers import assert_close_all, perturbed_adapter, run_both
from tests.core.oracle import oracle_layer
from tests.core.test_layers import LAYERS
from tuneqdm_core import AdapterConfig, QuantConfig, ScaleBank, quant_state, quantize_, routed
from tuneqdm_core.layers import QuantLayer
from tuneqdm_core.model import set_storage_mode
from tuneqdm_core.routing import Route, route_adapters

# (batch, spatial side or tokens): a small input (scales on the activation) and a large one
# (scales on the weight, whose 384–486 elements are then the smaller side).
SIZES = {"small": (1, 2), "large": (3, 12)}


def _input(kind: str, size: str, dtype: torch.dtype) -> torch.Tensor:
    batch, side = SIZES[size]
    if kind.startswith("linear"):
        return torch.randn(batch, side, 24, dtype=dtype)
    channels = 3 if "odd-k" in kind else 6
    return torch.randn(batch, channels, side + 2, side + 2, dtype=dtype)


def _layer_model(kind: str, bits: int, dtype: torch.dtype) -> tuple[nn.Module, QuantLayer]:
    model = nn.Sequential(LAYERS[kind]())
    quantize_(model, QuantConfig(bits=bits))  # type: ignore[arg-type]
    model = model.to(dtype)
    return model, quant_state(model).layers[0][1]


def _paths(model: nn.Module, x: torch.Tensor, route: Route) -> tuple[torch.Tensor, torch.Tensor]:
    """(fast path, per-sample path) outputs for the same route."""
    state = quant_state(model)
    outputs = []
    for fast in (True, False):
        state.uniform_fast_path = fast
        with torch.no_grad(), routed(model, route):
            outputs.append(model(x))
    state.uniform_fast_path = True
    return outputs[0], outputs[1]


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("storage", ["packed", "resident"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_uniform_route_matches_per_sample_path_and_oracle(
    kind: str, bits: int, storage: str, dtype: torch.dtype, rtol: float
) -> None:
    model, layer = _layer_model(kind, bits, dtype)
    set_storage_mode(model, storage, dtype)  # type: ignore[arg-type]
    adapter = perturbed_adapter(model, AdapterConfig(method="tuneqdm", intervals=2))
    peqa = perturbed_adapter(model, AdapterConfig(method="peqa", intervals=1))
    for size in SIZES:
        x = _input(kind, size, dtype)
        batch = x.shape[0]
        for chosen, t in ((adapter, 700), (peqa, 100)):
            route = route_adapters([chosen], [t] * batch)
            assert route.rows is None  # uniform
            fast, gather = _paths(model, x, route)
            s_out, s_in = chosen.layer_scales(0, chosen.config.interval_of(t))
            want = oracle_layer(layer, x, s_out, s_in)
            assert_close_all([fast, gather], [want, want], rtol)


@pytest.mark.parametrize("storage", ["packed", "resident"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize(
    ("kind", "shape", "in_on_weight", "out_on_weight"),
    [
        # 432 input values > 384 weights > 288 output values
        ("linear", (1, 18, 24), True, False),
        # 486 input values > 432 weights > 200 output values (stride 2)
        ("conv-stride-pad", (1, 6, 9, 9), True, False),
        # 384 input values < 432 weights < 512 output values
        ("conv-dilation-no-bias", (1, 6, 8, 8), False, True),
    ],
)
def test_scales_split_between_weight_and_activation(
    kind: str,
    shape: tuple[int, ...],
    in_on_weight: bool,
    out_on_weight: bool,
    storage: str,
    bits: int,
    dtype: torch.dtype,
    rtol: float,
) -> None:
    model, layer = _layer_model(kind, bits, dtype)
    set_storage_mode(model, storage, dtype)  # type: ignore[arg-type]
    x = torch.randn(shape, dtype=dtype)
    weight_numel = torch.Size(layer.weight_shape).numel()
    assert (weight_numel < x.numel(), weight_numel < layer.output_numel(x)) == (
        in_on_weight,
        out_on_weight,
    )
    adapter = perturbed_adapter(model, AdapterConfig(intervals=1))
    fast, gather = _paths(model, x, route_adapters([adapter], [3]))
    want = oracle_layer(layer, x, *adapter.layer_scales(0, 0))
    assert_close_all([fast, gather], [want, want], rtol)


@pytest.mark.parametrize("storage", ["packed", "resident"])
@pytest.mark.parametrize("bits", [4, 8])
def test_scale_bank_routes_uniform_and_mixed_batches(storage: str, bits: int) -> None:
    """A bank route whose samples all read one row is uniform (and matches the per-sample
    path); a mixed batch keeps its per-sample rows and matches the oracle sample by sample."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 1))
    quantize_(model, QuantConfig(bits=bits))  # type: ignore[arg-type]
    model = model.double()
    set_storage_mode(model, storage, torch.float64)  # type: ignore[arg-type]
    adapters = [perturbed_adapter(model, AdapterConfig(intervals=2)) for _ in range(2)]
    bank = ScaleBank(model, slots=3, max_intervals=2).double()
    for slot, adapter in enumerate(adapters, start=1):
        bank.load(slot, adapter)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)

    uniform = bank.route(700, torch.tensor([2, 2, 2, 2]))
    assert uniform.rows is None and uniform.row == 2 * 2 + 1
    fast, gather = _paths(model, x, uniform)
    assert_close_all([fast], [gather], 1e-10)
    with torch.no_grad(), routed(model, route_adapters([adapters[1]], [700] * 4)):
        assert_close_all([fast], [model(x)], 1e-10)

    mixed = bank.route(torch.tensor([700, 700, 100, 100]), torch.tensor([2, 1, 1, 0]))
    assert mixed.rows is not None
    fast, gather = _paths(model, x, mixed)
    assert torch.equal(fast, gather)  # the fast path is not taken
    with torch.no_grad():
        for b, (slot, t) in enumerate([(2, 700), (1, 700), (1, 100), (0, 100)]):
            if slot == 0:
                with routed(model, None):
                    want = model(x[b : b + 1])
            else:
                with routed(model, route_adapters([adapters[slot - 1]], [t])):
                    want = model(x[b : b + 1])
            assert_close_all([fast[b : b + 1]], [want], 1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv-groups"])
@pytest.mark.parametrize("storage", ["packed", "resident"])
def test_uniform_route_with_gradients_stays_exact(kind: str, storage: str) -> None:
    """Training on a uniform batch takes the per-sample path: outputs and scale gradients
    match the oracle."""
    model, _ = _layer_model(kind, 4, torch.float64)
    set_storage_mode(model, storage, torch.float64)  # type: ignore[arg-type]
    adapter = perturbed_adapter(model, AdapterConfig(intervals=2)).requires_grad_(True)
    x = _input(kind, "large", torch.float64).requires_grad_(True)

    def call() -> torch.Tensor:
        x.grad = None
        return model(x)

    batch = x.shape[0]
    (y, g), (y_ref, g_ref) = run_both(model, call, [adapter], [650] * batch, [0] * batch)
    assert_close_all([y], [y_ref], 1e-10)
    assert_close_all(g, g_ref, 1e-10)
    assert adapter.s_out[1].grad is not None and adapter.s_out[0].grad is None


@pytest.mark.parametrize("storage", ["packed", "resident"])
def test_uniform_route_under_bf16_autocast_stays_near_per_sample_path(storage: str) -> None:
    """16-bit products: the scaled weight is rounded once; both paths agree to bf16's
    precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 32, 1))
    quantize_(model, QuantConfig(bits=8))
    set_storage_mode(model, storage, torch.bfloat16)  # type: ignore[arg-type]
    adapter = perturbed_adapter(model, AdapterConfig(intervals=1))
    for x in (torch.randn(1, 16, 2, 2), torch.randn(2, 16, 24, 24)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fast, gather = _paths(model, x, route_adapters([adapter], [0] * x.shape[0]))
        assert_close_all([fast.float()], [gather.float()], 3e-2)


def test_bank_rows_on_the_host_match_the_device_formula_and_follow_loads() -> None:
    """Host-side routing gives the rows the device formula gives, and a slot loaded again
    (or reset) is served with its new scales (the cached s_out / s0 is dropped)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 10), nn.SiLU(), nn.Linear(10, 6))
    quantize_(model, QuantConfig(bits=8))
    model = model.double()
    set_storage_mode(model, "resident", torch.float64)
    first, second = (perturbed_adapter(model, AdapterConfig(intervals=2)) for _ in range(2))
    bank = ScaleBank(model, slots=2, max_intervals=2).double()
    bank.load(1, first)
    timesteps, slots = [0, 499, 500, 999, 250], [1, 1, 1, 0, 0]
    host = bank.route(timesteps, slots)
    # What ScaleBank.route computes on the device: slot × max_intervals + ⌊t·n/T⌋.
    assert host.rows is not None and host.rows.tolist() == [2, 2, 3, 0, 0]
    assert bank.route(torch.tensor(600), [1, 1]).row == 3

    x = torch.randn(2, 12, dtype=torch.float64)
    for adapter in (first, second):
        bank.load(1, adapter)
        with torch.no_grad(), routed(model, bank.route(600, [1, 1])):
            got = model(x)
        with torch.no_grad(), routed(model, route_adapters([adapter], [600, 600])):
            want = model(x)
        assert_close_all([got], [want], 1e-12)
    bank.reset(1)
    with torch.no_grad():
        bare = model(x)
        with routed(model, bank.route(600, [1, 1])):
            assert_close_all([model(x)], [bare], 1e-12)
    with pytest.raises(ValueError, match="slots must lie"):
        bank.route(0, [2])


@pytest.mark.parametrize("storage", ["packed", "resident"])
def test_uniform_route_returns_the_per_sample_dtype(storage: str) -> None:
    """A float64 base fed float32 input: both paths return float64 (what the next float64
    layer's parameters expect) and agree to float32 precision."""
    model, _ = _layer_model("conv-stride-pad", 4, torch.float64)
    set_storage_mode(model, storage, torch.float32)  # type: ignore[arg-type]
    adapter = perturbed_adapter(model, AdapterConfig(intervals=1))
    x = _input("conv-stride-pad", "large", torch.float32)
    fast, gather = _paths(model, x, route_adapters([adapter], [0] * x.shape[0]))
    assert fast.dtype == gather.dtype == torch.float64
    assert_close_all([fast], [gather], 2e-5)
