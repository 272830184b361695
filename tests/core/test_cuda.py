"""Checks that need a CUDA GPU (skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tests.conftest import subject_photos
from tests.core.helpers import assert_close_all, perturbed_adapter, run_both
from tests.core.oracle import oracle_mode
from tuneqdm_core import AdapterConfig, QuantConfig, ScaleBank, quantize_, set_route, use_adapter
from tuneqdm_core.base import load_base
from tuneqdm_core.finetune import FinetuneConfig, Progress, Sampling, Subject, finetune
from tuneqdm_core.generate import GenerationRequest, Precision, generate
from tuneqdm_core.model import set_storage_mode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _exact_matmuls() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def _stack(bits: int = 4) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 32),
    )
    quantize_(model, QuantConfig(bits=bits))  # type: ignore[arg-type]
    return model.cuda()


@pytest.mark.parametrize("bits", [4, 8])
def test_layers_match_oracle_on_cuda(bits: int) -> None:
    model = _stack(bits)
    adapters = [
        perturbed_adapter(model, AdapterConfig(intervals=2)),
        perturbed_adapter(model, AdapterConfig(method="peqa", intervals=1)),
    ]
    x = torch.randn(4, 8, 8, 8, device="cuda")
    (y, g), (y_ref, g_ref) = run_both(
        model, lambda: model(x), adapters, [5, 900, 400, 600], [0, 0, 1, 0]
    )
    assert_close_all([y], [y_ref], 1e-4)
    assert_close_all(g, g_ref, 1e-4)


def test_bank_routing_never_synchronises() -> None:
    model = _stack()
    bank = ScaleBank(model, slots=3, max_intervals=2)
    bank.load(1, perturbed_adapter(model, AdapterConfig(intervals=2)))
    x = torch.randn(6, 8, 8, 8, device="cuda")
    timesteps = torch.tensor([1, 999, 500, 20, 700, 300], device="cuda")
    slots = torch.tensor([0, 1, 1, 2, 0, 1], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            set_route(model, bank.route(timesteps, slots))
            model(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        set_route(model, None)


@pytest.mark.parametrize("storage", ["packed", "resident"])
def test_uniform_fast_path_on_cuda(storage: str) -> None:
    """A bank route from host timesteps and slots, one row for the whole batch: the fast path
    matches the per-sample path in fp32 and stays near it under bf16 autocast."""
    model = _stack()
    bank = ScaleBank(model, slots=2, max_intervals=2)
    bank.load(1, perturbed_adapter(model, AdapterConfig(intervals=2)))
    state = set_storage_mode(model, storage, torch.float32)  # type: ignore[arg-type]
    for batch in (1, 6):
        x = torch.randn(batch, 8, 8, 8, device="cuda")
        route = bank.route(700, [1] * x.shape[0])
        assert route.rows is None
        outputs = []
        for fast in (True, False):
            state.uniform_fast_path = fast
            with torch.no_grad():
                set_route(model, route)
                outputs.append(model(x))
                set_route(model, None)
        state.uniform_fast_path = True
        assert_close_all([outputs[0]], [outputs[1]], 1e-5)
    set_storage_mode(model, "packed")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        set_route(model, bank.route(700, [1, 1]))
        fast = model(x[:2])
        state.uniform_fast_path = False
        slow = model(x[:2])
        state.uniform_fast_path = True
        set_route(model, None)
    assert_close_all([fast.float()], [slow.float()], 3e-2)


def test_activation_side_training_keeps_no_weight_sized_tensors() -> None:
    layers = [nn.Linear(4096, 4096) for _ in range(6)]
    model = nn.Sequential(*layers)
    quantize_(model, QuantConfig(bits=4, range="minmax"))
    model.cuda()
    adapter = perturbed_adapter(model, AdapterConfig(intervals=2))
    x = torch.randn(2, 16, 4096, device="cuda")

    def peak(run_oracle: bool) -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        use_adapter(model, adapter, [100, 900])
        if run_oracle:
            with oracle_mode(model, [adapter], [100, 900], [0, 0]):
                model(x).square().mean().backward()
        else:
            model(x).square().mean().backward()
        adapter.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() - before

    ours, materialising = peak(False), peak(True)
    weight_bytes = 4096 * 4096 * 4
    mib = 2**20
    print(
        f"peak extra MiB: activation-side {ours / mib:.1f}, materialising {materialising / mib:.1f}"
    )
    # One layer's weight dequantized at a time (measured 150 MiB = 2.3 weights before the
    # in-place dequantization), whatever the depth; materialising kept 2435 MiB for 6 layers.
    assert ours < 2.5 * weight_bytes
    assert materialising > 6 * weight_bytes


def test_tiny_model_finetunes_and_generates_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    base = load_base(tiny_model_dir, cache_dir=tmp_path, device="cuda")
    where: list[str] = []

    def watch(progress: Progress) -> None:
        where.append(next(base.vae.parameters()).device.type)

    config = FinetuneConfig(
        steps=20,
        batch_size=2,
        resolution=32,
        lr_s_out=1e-3,
        lr_s_in=3e-2,
        mixed_precision="bf16",
        gradient_checkpointing=True,
    )
    result = finetune(
        base, [Subject("a photo of sks dog", subject_photos())], config, progress=watch
    )
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert set(where) == {"cpu"}  # VAE off the GPU while the UNet trained
    assert next(base.vae.parameters()).device.type == "cuda"  # and back after
    assert result.adapter is not None
    requests = [
        GenerationRequest(
            "a photo of sks dog", result.adapter, steps=4, width=32, height=32, seed=3
        ),
        GenerationRequest("a photo of a dog", None, steps=4, width=32, height=32, seed=4),
    ]
    together = generate(base, requests)
    alone = [generate(base, [r])[0] for r in requests]
    for a, b in zip(together, alone, strict=True):
        diff = np.abs(np.asarray(a[0].image, np.int16) - np.asarray(b[0].image, np.int16))
        assert int(diff.max()) <= 2


def test_progress_images_on_cuda_leave_training_unchanged(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Sampling inside the loop brings VAE and text encoder back for a moment and sends them
    off again; the adapter is the one a run without samples gives."""
    base = load_base(tiny_model_dir, cache_dir=tmp_path, device="cuda")
    config = FinetuneConfig(steps=6, resolution=32, mixed_precision="bf16")
    subjects = [Subject("a photo of sks dog", subject_photos())]
    where: list[str] = []
    made: list[tuple[int, int]] = []

    def watch(progress: Progress) -> None:
        where.append(next(base.vae.parameters()).device.type)

    sampling = Sampling(["a photo of sks dog"], every=3, size=32, steps=3, precision="auto")
    sampled = finetune(
        base,
        subjects,
        config,
        progress=watch,
        sampling=sampling,
        on_sample=lambda step, images, adapter: made.append((step, len(images))),
    )
    plain = finetune(base, subjects, config)
    assert made == [(3, 1), (6, 1)]
    assert set(where) == {"cpu"}  # off the GPU again after each sampling
    assert sampled.adapter is not None and plain.adapter is not None
    # Within what two CUDA runs may differ by (atomics in backward kernels); bit equality is
    # checked on the CPU (tests/worker/test_samples.py).
    for a, b in zip(sampled.adapter.parameters(), plain.adapter.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_mixed_adapter_batch_equals_requests_one_by_one_on_cuda(
    tiny_model_dir: Path, tmp_path: Path, precision: Precision
) -> None:
    base = load_base(tiny_model_dir, cache_dir=tmp_path, device="cuda")
    adapters = [
        perturbed_adapter(base.unet, AdapterConfig(intervals=2), spread=0.3),
        perturbed_adapter(base.unet, AdapterConfig(method="peqa", intervals=1), spread=0.3),
    ]
    common: dict[str, Any] = {"steps": 6, "width": 32, "height": 32}
    requests = [
        GenerationRequest("a photo of sks dog", adapters[0], num_images=2, seed=1, **common),
        GenerationRequest("a red bag", None, seed=5, guidance_scale=3.0, **common),
        GenerationRequest("a photo of sks cat", adapters[1], seed=7, **common),
    ]
    together = generate(base, requests, precision=precision)
    alone = [generate(base, [r], precision=precision)[0] for r in requests]
    # fp32: one level of 8-bit rounding, as on the CPU; bf16 sums batches in another order
    # at 8 bits of mantissa, which a few levels absorb.
    tolerance = 1 if precision == "fp32" else 6
    for a, b in zip(together, alone, strict=True):
        for x, y in zip(a, b, strict=True):
            diff = np.abs(np.asarray(x.image, np.int16) - np.asarray(y.image, np.int16))
            assert int(diff.max()) <= tolerance


def test_device_defaults_are_bf16_and_checkpointing_on_cuda() -> None:
    config = FinetuneConfig().for_device("cuda")
    assert config.mixed_precision in ("bf16", "fp16") and config.gradient_checkpointing
    assert FinetuneConfig().for_device("cpu").mixed_precision == "no"


@pytest.mark.parametrize("bits", [4, 8])
def test_resident_storage_matches_packed_on_cuda(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 autocast, the resident copy in bf16: the same outputs and scale gradients as the
    packed model (both products see the same bf16 W0), and no pass dequantizes."""
    from tests.core.helpers import grads
    from tuneqdm_core import route_adapters, routed
    from tuneqdm_core.layers import QuantLayer
    from tuneqdm_core.model import set_storage_mode

    model = _stack(bits)
    adapters = [perturbed_adapter(model, AdapterConfig(intervals=2))]
    x = torch.randn(4, 8, 8, 8, device="cuda")

    def run() -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        for adapter in adapters:
            adapter.zero_grad(set_to_none=True)
        route = route_adapters(adapters, torch.tensor([5.0, 900, 400, 600], device="cuda"))
        with routed(model, route):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(x).float()
            weights = torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)
            (y * weights).sum().backward()
        return y.detach(), grads(adapters)

    packed, packed_grads = run()
    set_storage_mode(model, "resident", torch.bfloat16)

    def refuse(*_: object, **__: object) -> torch.Tensor:
        raise AssertionError("a layer was dequantized")

    with monkeypatch.context() as patch:
        patch.setattr(QuantLayer, "dequantize", refuse)
        resident, resident_grads = run()
    assert torch.equal(resident, packed)
    assert_close_all(resident_grads, packed_grads, 1e-6)
