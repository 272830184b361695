"""Serving: adapter swap latency, and sampling throughput with several adapters in one batch.

    PYTHONPATH=. python benchmarks/serving.py [--device cpu|cuda]
        [--storage-mode packed|resident|both] [--json PATH]

1. Swap latency (SD 1.x architecture, random weights, a 2-interval TuneQDM adapter), p50/p99:
   file → memory (``load_adapter`` with the base check; the file is in the page cache after
   the first read) and memory → slot (``ScaleBank.load``; on cuda also host memory → slot).
2. Sampling throughput, images/s, for a batch of 8 requests (fixed number of UNet calls on a
   DDIM timestep sequence; no VAE or text encoder): 1, 2, 4 or 8 distinct adapters served in
   one batch through the ScaleBank ("mixed"), the same requests run adapter by adapter, each
   group a smaller batch after a swap into the slot ("grouped"), and the bare quantized UNet
   without any adapter ("bare"), on a tiny and a mid-size UNet. With one adapter every sample
   reads one scale row and the layers take their uniform fast path; "per-sample" is the same
   batch with that path off and a row index per sample (``QuantState.uniform_fast_path =
   False``: the gather and scale passes every routed call ran before the fast path), so one
   run shows both.
   ``--batch`` sets the batch (1: the SD 1.x target's setting; grouped modes need batch ≥ 2).
   ``--storage-mode`` picks how the quantized base holds its weights (docs/method.md "Storage
   modes"); ``both`` measures packed and resident on the same model (resident: bare,
   per-sample 1, mixed 1 and the most distinct adapters). A "float" row is the
   same UNet unquantized, in the sampling dtype (fp16 weights on cuda, as diffusers'
   ``StableDiffusionPipeline(torch_dtype=float16)`` runs it; fp32 on cpu): what a user would run
   instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

# This machine's cores are shared with other processes: spinning OpenMP workers then wait on a
# descheduled peer at every barrier (tiny UNet on 2 cores: 2 vs 100 images/s). libgomp reads
# this once, when torch loads it, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from benchmarks import common
from tuneqdm_core import (
    Adapter,
    AdapterConfig,
    QuantConfig,
    Route,
    ScaleBank,
    load_adapter,
    quant_state,
    quantize_,
    routed,
    save_adapter,
    set_storage_mode,
)
from tuneqdm_core.cli.reports import table
from tuneqdm_core.configs import UNET_CONFIGS, build_unet

BATCH = 8  # default --batch
TEXT_TOKENS = 77
DISTINCT = (1, 2, 4, 8)
# A mid-size UNet: SD 1.x's block structure at a fifth of its width.
MID_CONFIG: dict[str, Any] = {
    **UNET_CONFIGS["tiny-sd1"],
    "block_out_channels": (64, 128, 256),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 256,
    "sample_size": 32,
}


def _float_model(name: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**MID_CONFIG) if name == "mid" else build_unet(name)


def _model(name: str, bits: int, device: torch.device) -> UNet2DConditionModel:
    unet = _float_model(name)
    quantize_(unet, QuantConfig(bits=bits, range="minmax"))  # type: ignore[arg-type]
    return unet.to(device).eval()


def _trained_adapter(unet: UNet2DConditionModel, seed: int) -> Adapter:
    """A 2-interval TuneQDM adapter whose scales moved away from the base (as after training)."""
    adapter = Adapter.create(unet, AdapterConfig(method="tuneqdm", intervals=2))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*adapter.s_out, *adapter.s_in]:
            noise = torch.randn(p.shape, generator=generator).to(p.device)
            p.mul_(1 + 0.05 * noise)
    return adapter


def _latencies(fn: Callable[[], object], reps: int, device: torch.device) -> list[float]:
    fn()  # warm-up: first-call allocations, page cache
    common.sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        common.sync(device)
        times.append(time.perf_counter() - start)
    return times


def swap_latency(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    unet = _model(args.swap_arch, 8, device)
    adapter = _trained_adapter(unet, seed=1)
    bank = ScaleBank(unet, slots=8, max_intervals=2)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        path = save_adapter(adapter, Path(directory) / "adapter.safetensors")
        size = path.stat().st_size
        cases: list[tuple[str, Callable[[], object], int]] = [
            ("file -> memory", lambda: load_adapter(path, unet, device), args.file_reps),
            ("memory -> slot", lambda: bank.load(3, adapter), args.slot_reps),
        ]
        if device.type == "cuda":
            on_host = _trained_adapter(unet, seed=2).to("cpu")
            cases.append(("host memory -> slot", lambda: bank.load(3, on_host), args.slot_reps))
        for name, fn, reps in cases:
            times = _latencies(fn, reps, device)
            rows.append(
                {
                    "swap": name,
                    "p50_ms": common.percentile(times, 50) * 1e3,
                    "p99_ms": common.percentile(times, 99) * 1e3,
                    "reps": reps,
                }
            )
    print(
        f"\nAdapter swap latency: {args.swap_arch} UNet, TuneQDM adapter with 2 intervals, "
        f"{adapter.num_values():,} values, file {size / 1e6:.2f} MB"
    )
    print(
        table(
            ["swap", "p50 ms", "p99 ms", "reps"],
            [[r["swap"], f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", r["reps"]] for r in rows],
        )
    )
    return rows


def _sample(
    unet: UNet2DConditionModel,
    scheduler: DDIMScheduler,
    latents: torch.Tensor,
    text: torch.Tensor,
    route: Callable[[torch.Tensor], Route | None] | None,
) -> torch.Tensor:
    """The UNet loop of a sampler: one UNet call per timestep, each under its own route
    (``route=None``: a plain, unquantized UNet)."""
    x = latents
    for t in scheduler.timesteps:
        with routed(unet, route(t)) if route is not None else nullcontext():
            eps = unet(x, t, text).sample
        x = scheduler.step(eps, t, x).prev_sample
    return x


def _timed(
    modes: list[tuple[str, int, Callable[[], None]]],
    reps: int,
    device: torch.device,
    autocast: Any,
    batch: int,
) -> dict[tuple[str, int], float]:
    """images/s of each mode, the median of ``reps`` rounds after one warm-up round."""
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode(), autocast:
        for round_ in range(reps + 1):
            for mode, distinct, fn in modes:
                common.sync(device)
                start = time.perf_counter()
                fn()
                common.sync(device)
                if round_:
                    times.setdefault((mode, distinct), []).append(time.perf_counter() - start)
    return {key: batch / common.median(value) for key, value in times.items()}


def throughput(args: argparse.Namespace, name: str, device: torch.device) -> list[dict[str, Any]]:
    unet = _model(name, args.bits, device)
    batch = args.batch
    distinct_counts = [d for d in DISTINCT if d <= batch and batch % d == 0]
    most = distinct_counts[-1]
    adapters = [_trained_adapter(unet, seed=i) for i in range(most)]
    bank = ScaleBank(unet, slots=most, max_intervals=2)
    for slot, adapter in enumerate(adapters):
        bank.load(slot, adapter)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(args.steps)
    generator = torch.Generator(device).manual_seed(0)
    shape = (batch, unet.config.in_channels, args.latent, args.latent)
    latents = torch.randn(shape, generator=generator, device=device)
    text = torch.randn(
        (batch, TEXT_TOKENS, unet.config.cross_attention_dim), generator=generator, device=device
    )

    def bare() -> None:
        _sample(unet, scheduler, latents, text, lambda t: None)

    state = quant_state(unet)

    def per_sample(route: Route) -> Route:
        """The route as ScaleBank.route built it before uniform routes: a row per sample."""
        if route.rows is not None:
            return route
        rows = torch.full((batch,), route.row, device=device)
        return Route(out_parts=route.out_parts, in_parts=route.in_parts, rows=rows)

    def mixed(distinct: int, fast: bool = True) -> Callable[[], None]:
        slots = torch.arange(batch) % distinct  # on the host, as generate() gives them

        def route(t: torch.Tensor) -> Route:
            return bank.route(t, slots) if fast else per_sample(bank.route(t, slots))

        def run() -> None:
            state.uniform_fast_path = fast
            try:
                _sample(unet, scheduler, latents, text, route)
            finally:
                state.uniform_fast_path = True

        return run

    def grouped(distinct: int) -> Callable[[], None]:
        size = batch // distinct
        slot = torch.zeros(1, dtype=torch.long)

        def run() -> None:
            for group in range(distinct):
                bank.load(0, adapters[group])  # the swap before each group
                part = slice(group * size, (group + 1) * size)
                _sample(
                    unet,
                    scheduler,
                    latents[part],
                    text[part],
                    lambda t: bank.route(t, slot),
                )

        return run

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
    storages = ["packed", "resident"] if args.storage_mode == "both" else [args.storage_mode]
    speed: dict[tuple[str, str, int], float] = {}
    for storage in storages:
        # The resident copy in the sampling dtype, so that no UNet call dequantizes.
        set_storage_mode(unet, storage, torch.bfloat16 if args.bf16 else torch.float32)  # type: ignore[arg-type]
        modes: list[tuple[str, int, Callable[[], None]]] = [
            ("bare", 0, bare),
            ("per-sample", 1, mixed(1, fast=False)),
        ]
        if storage == "packed" or len(storages) == 1:
            modes += [("mixed", d, mixed(d)) for d in distinct_counts]
            modes += [("grouped", d, grouped(d)) for d in distinct_counts if d > 1]
        else:  # the second storage mode: what its comparison needs
            modes += [("mixed", d, mixed(d)) for d in sorted({1, most})]
        timed = _timed(modes, args.reps, device, autocast, batch)
        for (mode, distinct), value in timed.items():
            speed[(storage, mode, distinct)] = value
    set_storage_mode(unet, "packed")
    if args.float_baseline:
        # What a user would run instead: the float UNet in the sampling dtype, no adapter.
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        plain = _float_model(name).to(device, dtype).eval()
        half_latents, half_text = latents.to(dtype), text.to(dtype)

        def float_unet() -> None:
            _sample(plain, scheduler, half_latents, half_text, None)

        timed = _timed([("float", 0, float_unet)], args.reps, device, nullcontext(), batch)
        speed[("float", "float", 0)] = timed[("float", 0)]
        del plain

    rows: list[dict[str, Any]] = []
    for (storage, mode, distinct), value in speed.items():
        base = storage if storage != "float" else storages[0]
        rows.append(
            {
                "model": name,
                "storage": storage,
                "mode": mode,
                "distinct": distinct,
                "images_per_s": value,
                "vs_mixed_1": value / speed[(base, "mixed", 1)],
                "vs_bare": value / speed[(base, "bare", 0)],
            }
        )
    params = sum(b.numel() for _, b in unet.named_buffers() if b.dtype == torch.uint8)
    codes = "packed codes" if args.bits == 4 else "codes"
    print(
        f"\nSampling throughput: {name} UNet ({params / 1e6:.1f} M bytes of {codes}, W{args.bits}),"
        f" batch {batch}, latent {args.latent}x{args.latent}, {args.steps} UNet calls per image, "
        f"median of {args.reps} rounds"
    )
    print(
        table(
            ["storage", "mode", "distinct adapters", "images/s", "x mixed-1", "x bare"],
            [
                [
                    r["storage"],
                    r["mode"],
                    r["distinct"] or "-",
                    f"{r['images_per_s']:.3g}",
                    f"{r['vs_mixed_1']:.3f}",
                    f"{r['vs_bare']:.3f}",
                ]
                for r in rows
            ],
        )
    )
    for storage in storages:
        one, plain = speed[(storage, "mixed", 1)], speed[(storage, "bare", 0)]
        before = speed[(storage, "per-sample", 1)]
        line = (
            f"{storage}: {most} distinct / 1 distinct = {speed[(storage, 'mixed', most)] / one:.3f}"
            f" (target >= 0.9); adapter overhead vs bare = {(plain / one - 1) * 100:+.1f} % "
            f"(target <= 5 %; per-sample path {(plain / before - 1) * 100:+.1f} %); "
            f"with an adapter / bare = {one / plain:.3f} (target >= 0.95)"
        )
        if ("float", "float", 0) in speed:
            ratio = one / speed[("float", "float", 0)]
            line += f"; with an adapter / float UNet = {ratio:.3f}"
        print(line)
    if len(storages) == 2:
        ratio = speed[("resident", "mixed", 1)] / speed[("packed", "mixed", 1)]
        print(f"resident / packed, one adapter: {ratio:.3f}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--swap-arch", default="sd1", choices=sorted(UNET_CONFIGS))
    parser.add_argument("--file-reps", type=int, default=30)
    parser.add_argument("--slot-reps", type=int, default=300)
    parser.add_argument(
        "--models", nargs="*", default=["tiny-sd1", "mid"], help="tiny-sd1, mid, or any arch"
    )
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--batch", type=int, default=BATCH, help="requests in one batch")
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="UNet calls per image")
    parser.add_argument("--reps", type=int, default=3, help="timed rounds of every mode")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on cuda")
    parser.add_argument(
        "--storage-mode",
        default="packed",
        choices=["packed", "resident", "both"],
        help="how the quantized base holds its weights (both: packed and resident side by side)",
    )
    parser.add_argument(
        "--no-float-baseline",
        dest="float_baseline",
        action="store_false",
        help="skip the unquantized UNet row",
    )
    parser.add_argument("--json", metavar="PATH", help="write all numbers here")
    args = parser.parse_args()
    args.bf16 = args.device == "cuda" and not args.fp32
    device = torch.device(args.device)
    start = time.perf_counter()
    print(f"machine: {common.machine()}; {'bf16 autocast' if args.bf16 else 'fp32'}")
    swaps = swap_latency(args, device)
    rows = [row for name in args.models for row in throughput(args, name, device)]
    common.write_json(
        args.json,
        {
            "benchmark": "serving",
            "settings": {
                k: getattr(args, k)
                for k in (
                    "device",
                    "swap_arch",
                    "bits",
                    "batch",
                    "latent",
                    "steps",
                    "reps",
                    "bf16",
                    "storage_mode",
                )
            },
            "machine": common.machine(),
            "swap": swaps,
            "throughput": rows,
            "wall_seconds": time.perf_counter() - start,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
