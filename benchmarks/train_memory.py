"""Training memory and step time: full fine-tuning, PEQA, materialising and activation-side
TuneQDM, each in a fresh process, side by side in one table (ratios, since machines are noisy).

    PYTHONPATH=. python benchmarks/train_memory.py [--latent 32|64] [--batch 1|4]
        [--variants full materialising-w8 tuneqdm-w4-ckpt ...|all] [--device cpu|cuda]
        [--storage-mode packed|resident|both] [--json PATH]

Model: the SD 1.x UNet architecture (public config, random weights), text states 77×768;
``--arch sdxl`` takes SDXL's UNet (text states 77×2048 plus its added conditioning: a random
pooled text embedding and the time ids of an uncropped image at the step's size), ``--arch
tiny-sdxl`` its tiny version (what the tests run: seconds, not minutes).
One step: random latents and noise, a random timestep per sample, ε-prediction MSE, AdamW.
Variant names: ``full`` (fp32 DreamBooth, every weight trained), ``materialising-w{8,4}``
(the paper's formulation, benchmarks/materialising.py), ``peqa-w{8,4}``, ``tuneqdm-w{8,4}``
(2 intervals); a ``-ckpt`` suffix turns on gradient checkpointing; a ``-resident`` suffix
(peqa/tuneqdm only) holds the base in the resident storage mode (docs/method.md "Storage
modes"): one dequantized copy of every weight, in the step's compute dtype, made at load.
``--storage-mode resident`` runs the peqa/tuneqdm variants resident, ``both`` runs each of them
packed and resident, side by side with the baselines.

``--arch flux`` / ``--arch sd3``: FLUX.1's and SD3.5-large's transformers at their real width,
a measured subset of their blocks (benchmarks/dit_blocks.py) with the full depth extrapolated
pro rata by parameters and printed as such; ``--latent`` is then the side of the grid of latent
tokens (16: 256 image tokens, a 256 px image), text 32 tokens of T5's width plus the pooled
CLIP vector. One step: flow matching (velocity target, σ uniform). Variants for these: the
``peqa``/``tuneqdm``/``materialising`` ones and ``lora-w{4,8}``: a peft LoRA (rank
``--lora-rank``, diffusers' DreamBooth LoRA target layers) on the same frozen quantized base;
ratios are against ``lora-w4``. ``tiny-flux``/``tiny-sd3``: the same at toy width (tests).
``--full-depth`` builds the whole transformer instead, on ``--device`` in the step's dtype,
quantized there (a GPU's memory: FLUX.1 is 24 GB in bf16; benchmarks/gpu.sh).

Memory. CPU: ``load peak`` is the process's peak RSS while building the fp32 UNet and
quantizing it (the fp32 model exists once, whole); ``train peak`` is the peak RSS during the
training steps only (the high-water mark is reset after loading), i.e. everything resident while
training: torch and diffusers code, the (quantized) model, optimizer state, activations.
GPU: ``torch.cuda.max_memory_allocated`` after moving the model (load) and during the steps
(train); building and quantizing run on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# This machine's cores are shared with other processes: spinning OpenMP workers then wait on a
# descheduled peer at every barrier (tiny UNet on 2 cores: 2 vs 100 images/s). libgomp reads
# this once, when torch loads it, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from benchmarks import common, dit_blocks
from benchmarks.materialising import materialise_
from tuneqdm_core import (
    Adapter,
    AdapterConfig,
    QuantConfig,
    param_groups,
    quantize_,
    set_storage_mode,
)
from tuneqdm_core.base import time_ids
from tuneqdm_core.cli.reports import table
from tuneqdm_core.configs import UNET_CONFIGS, build_unet
from tuneqdm_core.families.flow import FlowFamily
from tuneqdm_core.routing import route_adapters, routed

METHODS = ("full", "materialising", "peqa", "tuneqdm", "lora")
ALL_VARIANTS = [
    f"{name}{ckpt}"
    for name in (
        "full",
        "materialising-w8",
        "peqa-w8",
        "peqa-w4",
        "tuneqdm-w8",
        "tuneqdm-w4",
    )
    for ckpt in ("", "-ckpt")
]
# A few minutes on a 2-core CPU at 256 px (docs/benchmarks.md).
DEFAULT_VARIANTS = ["full", "materialising-w8", "peqa-w8", "tuneqdm-w8", "tuneqdm-w4-ckpt"]
TEXT_TOKENS = 77
REFERENCE_FULL = "full"
REFERENCE_MATERIALISING = "materialising-w8"
# The transformers: the variants side by side, and the row the ratios are against.
DIT_VARIANTS = ["tuneqdm-w4-ckpt", "peqa-w4", "lora-w4", "materialising-w4"]
REFERENCE_LORA = "lora-w4"


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    bits: int | None
    checkpointing: bool
    resident: bool = False

    @classmethod
    def parse(cls, name: str) -> Variant:
        match = re.fullmatch(
            r"(full|materialising|peqa|tuneqdm|lora)(?:-w([48]))?(-ckpt)?(-resident)?", name
        )
        if (
            match is None
            or (match[1] == "full") != (match[2] is None)
            or (match[4] and match[1] not in ("peqa", "tuneqdm"))
        ):
            raise ValueError(
                f"unknown variant {name!r}: expected full[-ckpt], "
                "{materialising,lora}-w{4,8}[-ckpt] or {peqa,tuneqdm}-w{4,8}[-ckpt][-resident], "
                "e.g. tuneqdm-w4-ckpt-resident"
            )
        bits = None if match[2] is None else int(match[2])
        return cls(name, match[1], bits, bool(match[3]), bool(match[4]))

    @property
    def storage_mode(self) -> str | None:
        """The base's storage mode; None where there is no quantized base read per pass."""
        if self.method not in ("peqa", "tuneqdm"):
            return None
        return "resident" if self.resident else "packed"


def with_storage_modes(names: list[str], mode: str) -> list[str]:
    """``names`` with their peqa/tuneqdm variants in storage ``mode`` (packed, resident or both,
    each packed variant followed by its resident twin); other variants unchanged."""
    out: list[str] = []
    for name in names:
        variant = Variant.parse(name)
        if variant.storage_mode is None or variant.resident:
            out.append(name)
            continue
        if mode in ("packed", "both"):
            out.append(name)
        if mode in ("resident", "both"):
            out.append(f"{name}-resident")
    return out


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: build, quantize, move, train, measure."""
    variant = Variant.parse(args.variant)
    device = torch.device(args.device)
    torch.manual_seed(0)

    # Resident before the model exists (torch, diffusers): what no depth changes.
    process_base = common.rss_bytes()
    start = time.perf_counter()
    dit = args.arch in dit_blocks.CONFIGS
    if dit and variant.method == "full":
        raise ValueError("--arch flux/sd3: the variants train scales or a LoRA, not full")
    unet: Any
    if dit and args.full_depth:
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        assert variant.bits is not None
        unet = dit_blocks.build_quantized(args.arch, True, device, dtype, variant.bits)
    else:
        unet = dit_blocks.build_subset(args.arch) if dit else build_unet(args.arch)
    if variant.method != "full" and not hasattr(unet, "tuneqdm_state"):
        assert variant.bits is not None
        # min-max ranges: the range search changes no byte or FLOP, only the load time.
        quantize_(unet, QuantConfig(bits=variant.bits, range="minmax"))  # type: ignore[arg-type]
    unet.to(device)
    if variant.resident:
        # In the dtype the products run in, so that no pass dequantizes.
        set_storage_mode(unet, "resident", torch.bfloat16 if args.bf16 else torch.float32)
    load_seconds = time.perf_counter() - start
    load_peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else common.peak_rss_bytes()
    )

    scales = None
    adapter = None
    params: list[dict[str, Any]]
    if variant.method == "full":
        unet.requires_grad_(True)
        params = [{"params": list(unet.parameters()), "lr": 5e-6, "weight_decay": 1e-2}]
    elif variant.method == "lora":
        params = [{"params": _add_lora(unet, args), "lr": 1e-4}]
    else:
        config = (
            AdapterConfig(method="peqa", intervals=1)
            if variant.method == "peqa"
            else AdapterConfig(method="tuneqdm", intervals=2)
        )
        adapter = Adapter.create(unet, config)
        params = param_groups(adapter, lr_s_out=1e-5, lr_s_in=1e-3)
        if variant.method == "materialising":
            scales = materialise_(unet, adapter)
    trainable = sum(p.numel() for group in params for p in group["params"])
    optimizer = torch.optim.AdamW(params)
    if variant.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()

    peak_reset = True
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        common.release_freed_memory()
        peak_reset = common.reset_peak_rss()
    before_steps = (
        torch.cuda.memory_allocated(device) if device.type == "cuda" else common.rss_bytes()
    )

    generator = torch.Generator(device).manual_seed(0)

    def flow_step() -> float:
        """One optimizer step of flow matching on a fresh random batch (the transformers)."""
        kwargs, target, sigmas = dit_blocks.flow_inputs(
            unet, args.batch, args.latent, generator, device, args.text_tokens
        )
        tas = torch.tensor(FlowFamily.tas_timesteps(sigmas), device=device)
        route = None
        if adapter is not None and scales is None:
            route = route_adapters([adapter], tas)
        if scales is not None:
            scales.set_timesteps(tas)
        with routed(unet, route) if route is not None else nullcontext():
            with autocast:
                prediction = unet(**kwargs)[0]
            loss = F.mse_loss(prediction.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        return float(loss)

    if not dit:
        cross_dim = unet.config.cross_attention_dim
        shape = (args.batch, unet.config.in_channels, args.latent, args.latent)
        added = _added_conditioning(unet.config, args.batch, args.latent * 8, generator, device)

    def step() -> float:
        """One optimizer step on a fresh random batch; returns the loss (synchronised)."""
        latents = torch.randn(shape, generator=generator, device=device)
        noise = torch.randn(shape, generator=generator, device=device)
        text = torch.randn((args.batch, TEXT_TOKENS, cross_dim), generator=generator, device=device)
        timesteps = torch.randint(0, 1000, (args.batch,), generator=generator, device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        route = None
        if adapter is not None and scales is None:
            route = route_adapters([adapter], timesteps)
        if scales is not None:
            scales.set_timesteps(timesteps)
        # The backward stays inside: checkpointing reads the route again there.
        with routed(unet, route) if route is not None else nullcontext():
            with autocast:
                prediction = unet(noisy, timesteps, text, **added).sample
            loss = F.mse_loss(prediction.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        return float(loss)  # synchronises on cuda

    run = flow_step if dit else step
    times = []
    for _ in range(args.warmup + args.steps):
        step_start = time.perf_counter()
        loss = run()
        times.append(time.perf_counter() - step_start)

    if device.type == "cuda":
        train_peak = torch.cuda.max_memory_allocated(device)
    else:
        train_peak = common.peak_rss_bytes()
    profile = {}
    if args.profile:
        # The materialising wrappers never call QuantLayer.dequantize: no pass to time.
        profile = _profile(unet, run, device, autocast, variant.method in ("peqa", "tuneqdm"))
    timed = times[args.warmup :]
    return {
        "variant": variant.name,
        "method": variant.method,
        "bits": variant.bits,
        "checkpointing": variant.checkpointing,
        "storage_mode": variant.storage_mode,
        "trainable_values": trainable,
        "load_peak_bytes": load_peak,
        "process_base_bytes": process_base,
        "before_steps_bytes": before_steps,
        "train_peak_bytes": train_peak,
        # False: the kernel refused to reset the high-water mark, train peak includes loading.
        "train_peak_excludes_load": peak_reset,
        "load_seconds": load_seconds,
        "step_seconds": common.median(timed),
        "step_seconds_min": min(timed),
        "step_seconds_all": times,
        "loss": loss,
        **profile,
    }


def _add_lora(model: torch.nn.Module, args: argparse.Namespace) -> list[torch.nn.Parameter]:
    """A peft LoRA of rank ``args.lora_rank`` on the frozen quantized ``model`` (diffusers'
    DreamBooth LoRA target layers); returns the trainable LoRA parameters."""
    # peft is the baseline's library, not the core's: imported only where that row runs.
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora.layer import Linear as LoraLinear

    from tuneqdm_core import QuantLinear, quant_state

    if args.arch not in dit_blocks.CONFIGS:
        raise ValueError("the lora variants are for --arch flux|sd3|tiny-flux|tiny-sd3")
    model.requires_grad_(False)
    for _, layer in quant_state(model).layers:
        # peft places a new LoRA layer on the device of its base layer's ``qweight`` (the name
        # quantized layers of other libraries use); a QuantLayer keeps its codes as a buffer.
        layer.qweight = layer.codes
    config = LoraConfig(
        r=args.lora_rank,
        lora_alpha=args.lora_rank,
        init_lora_weights="gaussian",
        target_modules=dit_blocks.LORA_TARGETS[dit_blocks.family(args.arch)],
    )
    # peft's own Linear LoRA runs any base layer's forward and adds B·A·x beside it.
    config._register_custom_module({QuantLinear: LoraLinear})
    inject_adapter_in_model(config, model)
    return [p for p in model.parameters() if p.requires_grad]


def _added_conditioning(
    config: Any, batch: int, pixels: int, generator: torch.Generator, device: torch.device
) -> dict[str, Any]:
    """SDXL's added conditioning (nothing for SD 1.x/2.x): a random pooled text embedding of
    the width the UNet's added embedding takes beside the six time ids, and the time ids of
    an uncropped ``pixels``-square image (tuneqdm_core.base.time_ids)."""
    if config.get("addition_embed_type") != "text_time":
        return {}
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    ids = time_ids((pixels, pixels), (0, 0), (pixels, pixels))
    return {
        "added_cond_kwargs": {
            "text_embeds": torch.randn((batch, pooled), generator=generator, device=device),
            "time_ids": torch.tensor([ids] * batch, dtype=torch.float32, device=device),
        }
    }


def _profile(
    unet: torch.nn.Module,
    step: Callable[[], float],
    device: torch.device,
    autocast: Any,
    time_dequantize: bool,
) -> dict[str, Any]:
    """Where a step's time goes: the top operators of one more step, and for quantized models
    the time of one dequantization pass over every layer (the activation-side layers run one
    per forward and one per backward, and one more per recomputed forward with checkpointing).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    result: dict[str, Any] = {
        "profile_table": prof.key_averages().table(sort_by=sort, row_limit=15)
    }
    state = getattr(unet, "tuneqdm_state", None)
    if state is not None and time_dequantize:
        dtype = (
            torch.get_autocast_dtype(device.type)
            if not isinstance(autocast, nullcontext)
            else torch.float32
        )
        common.sync(device)
        start = time.perf_counter()
        for _, layer in state.layers:
            layer.dequantize(dtype)
        common.sync(device)
        result["dequantize_pass_seconds"] = time.perf_counter() - start
    return result


def _row(result: dict[str, Any], references: list[dict[str, Any]]) -> list[object]:
    width = 6 + 2 * len(references)
    if "error" in result:
        return [result["variant"], "failed: " + result["error"], *[""] * (width - 2)]
    peak = result["train_peak_bytes"]
    step = result["step_seconds"]
    return [
        result["variant"],
        f"{result['trainable_values'] / 1e6:.2f}",
        f"{result['load_peak_bytes'] / common.GIB:.2f}",
        f"{peak / common.GIB:.2f}",
        *[common.ratio(peak, ref.get("train_peak_bytes")) for ref in references],
        f"{step:.2f}",
        f"{result['step_seconds_min']:.2f}",
        *[common.ratio(step, ref.get("step_seconds")) for ref in references],
    ]


def _header(labels: list[str]) -> list[str]:
    return [
        "variant",
        "trained M",
        "load peak GiB",
        "train peak GiB",
        *[f"mem/{label}" for label in labels],
        "step s",
        "min s",
        *[f"time/{label}" for label in labels],
    ]


def _extrapolation(results: list[dict[str, Any]], arch: str) -> list[str]:
    """The measured subset's figures per block and at the full depth, pro rata by parameters
    (attention over more tokens is not in it). Memory as a range: at least the resident model
    (RSS before the steps less RSS before loading) grows with the depth, at most everything
    above the RSS before loading (activations kept per block, which checkpointing avoids).
    Step time grows with the parameters (the linear layers are almost all of it)."""
    counts = dit_blocks.parameter_counts(arch)
    factor = counts["full"] / counts["subset"]
    subset = " + ".join(f"{n} {kind}" for kind, n in counts["blocks_subset"].items())
    full = " + ".join(f"{n} {kind}" for kind, n in counts["blocks_full"].items())
    per_block = ", ".join(f"{kind} {n / 1e6:.0f} M" for kind, n in counts["per_block"].items())
    lines = [
        f"measured subset: {subset} blocks, {counts['subset'] / 1e9:.2f} B float parameters; "
        f"full depth: {full} blocks, {counts['full'] / 1e9:.2f} B ({per_block} per block)",
        f"EXTRAPOLATED to the full depth (x{factor:.1f} by parameters; not measured): resident "
        "model GiB and step s per block; full-depth train peak from 'resident grows' to "
        "'everything grows'",
    ]
    rows = []
    for r in results:
        if "error" in r:
            continue
        base, before, peak = r["process_base_bytes"], r["before_steps_bytes"], r["train_peak_bytes"]
        resident = max(before - base, 0) / counts["subset"]
        step = r["step_seconds"] / counts["subset"]
        low = peak + resident * (counts["full"] - counts["subset"])
        high = base + (peak - base) * factor
        r["extrapolated"] = {
            "train_peak_bytes_low": low,
            "train_peak_bytes_high": high,
            "step_seconds": step * counts["full"],
            "per_block": {
                kind: {"resident_bytes": resident * n, "step_seconds": step * n}
                for kind, n in counts["per_block"].items()
            },
        }
        blocks = r["extrapolated"]["per_block"].values()
        rows.append(
            [
                r["variant"],
                *[
                    f"{b['resident_bytes'] / common.GIB:.2f} / {b['step_seconds']:.2f}"
                    for b in blocks
                ],
                f"{low / common.GIB:.1f} - {high / common.GIB:.1f}",
                f"{step * counts['full']:.0f}",
            ]
        )
    kinds = [f"{kind} block GiB / s" for kind in counts["per_block"]]
    lines.append(table(["variant", *kinds, "full train peak GiB", "full step s"], rows))
    return lines


def _parent(args: argparse.Namespace) -> int:
    dit = args.arch in dit_blocks.CONFIGS
    default = DIT_VARIANTS if dit else DEFAULT_VARIANTS
    variants = args.variants or default
    variants = ALL_VARIANTS if variants == ["all"] else variants
    try:
        variants = with_storage_modes(variants, args.storage_mode)
    except ValueError as error:
        print(f"train_memory.py: error: {error}", file=sys.stderr)
        return 2
    child_args = [
        *("--arch", args.arch, "--latent", str(args.latent), "--batch", str(args.batch)),
        *("--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device),
        "--bf16" if args.bf16 else "--fp32",
        *(["--profile"] if args.profile else []),
        *("--lora-rank", str(args.lora_rank), "--text-tokens", str(args.text_tokens)),
        *(["--full-depth"] if args.full_depth else []),
    ]
    results = []
    start = time.perf_counter()
    for name in variants:
        variant_start = time.perf_counter()
        left = args.budget - (variant_start - start) if args.budget else args.timeout
        if left < 1:
            results.append({"variant": name, "error": f"skipped: --budget {args.budget:.0f} s"})
            continue
        timeout = min(args.timeout, left)
        result = common.run_child(Path(__file__), [*child_args, "--variant", name], timeout)
        result.setdefault("variant", name)
        result["wall_seconds"] = time.perf_counter() - variant_start
        results.append(result)
        status = result.get("error") or f"{result['train_peak_bytes'] / common.GIB:.2f} GiB"
        print(f"  {name}: {status} ({result['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    by_name = {r["variant"]: r for r in results if "error" not in r}
    if args.reference and Path(args.reference).exists():
        # Baselines measured by an earlier run with the same settings.
        earlier = json.loads(Path(args.reference).read_text())["variants"]
        by_name = {r["variant"]: r for r in earlier if "error" not in r} | by_name
    if dit:
        labels, names = ["lora"], [REFERENCE_LORA]
    else:
        labels, names = ["full", "mat"], [REFERENCE_FULL, REFERENCE_MATERIALISING]
    references = [by_name.get(name, {}) for name in names]
    memory = "peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    precision = "bf16 autocast" if args.bf16 else "fp32"
    if dit:
        side = args.latent
        depth = "full depth" if args.full_depth else "real width, a subset of its blocks"
        print(
            f"Training step, {args.arch} transformer ({depth}, random "
            f"weights), {side}x{side} latent tokens, batch {args.batch}, text "
            f"{args.text_tokens} tokens + pooled, flow matching, {precision}, LoRA rank "
            f"{args.lora_rank}, median of {args.steps} steps after {args.warmup} warm-up; "
            f"memory = {memory}"
        )
    else:
        xl = UNET_CONFIGS[args.arch].get("addition_embed_type") == "text_time"
        text = f"text {TEXT_TOKENS} tokens" + (" + pooled text and time ids" if xl else "")
        print(
            f"Training step, {args.arch} UNet (random weights), latent {args.latent}x"
            f"{args.latent} ({args.latent * 8} px), batch {args.batch}, {text}, {precision}, "
            f"median of {args.steps} steps after {args.warmup} warm-up; memory = {memory}"
        )
    print(f"machine: {common.machine()}")
    print(table(_header(labels), [_row(r, references) for r in results]))
    print("ratios: " + ", ".join(f"/{a} = vs {b}" for a, b in zip(labels, names, strict=True)))
    if dit and not args.full_depth:
        print("\n".join(_extrapolation(results, args.arch)))
    if any(not r.get("train_peak_excludes_load", True) for r in results):
        print("warning: could not reset the peak RSS here; train peak includes the load peak")
    for r in results:
        if "profile_table" in r:
            dequant = r.get("dequantize_pass_seconds")
            passes = "" if dequant is None else f"; one dequantization pass {dequant:.2f} s"
            print(f"\nprofile of one step, {r['variant']}{passes}\n{r['profile_table']}")
    common.write_json(
        args.json,
        {
            "benchmark": "train_memory",
            "settings": {
                k: getattr(args, k)
                for k in (
                    "arch",
                    "latent",
                    "batch",
                    "warmup",
                    "steps",
                    "device",
                    "bf16",
                    "storage_mode",
                    "lora_rank",
                    "text_tokens",
                    "full_depth",
                )
            },
            "machine": common.machine(),
            "variants": results,
            "wall_seconds": time.perf_counter() - start,
        },
    )
    return 0 if all("error" not in r for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", default="sd1", choices=sorted([*UNET_CONFIGS, *dit_blocks.CONFIGS])
    )
    parser.add_argument(
        "--latent", type=int, default=32, help="latent side (px / 8); flux/sd3: token grid side"
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (default on cuda; scales stay fp32)"
    )
    parser.add_argument("--fp32", action="store_true", help="no autocast, also on cuda")
    parser.add_argument(
        "--variants",
        nargs="+",
        help=f"or: all; default {' '.join(DEFAULT_VARIANTS)} (flux/sd3: {' '.join(DIT_VARIANTS)})",
    )
    parser.add_argument("--lora-rank", type=int, default=16, help="rank of the lora variants")
    parser.add_argument(
        "--text-tokens", type=int, default=dit_blocks.TEXT_TOKENS, help="flux/sd3 text length"
    )
    parser.add_argument(
        "--full-depth",
        action="store_true",
        help="flux/sd3: the whole transformer, built on --device in the step's dtype (a GPU's "
        "memory: FLUX.1 is 24 GB in bf16) and quantized there; default a subset of blocks",
    )
    parser.add_argument(
        "--storage-mode",
        default="packed",
        choices=["packed", "resident", "both"],
        help="storage mode of the peqa/tuneqdm variants' base (both: each variant in both)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per variant")
    parser.add_argument(
        "--budget", type=float, help="seconds for all variants; later ones are skipped, not run"
    )
    parser.add_argument("--json", metavar="PATH", help="write all numbers here")
    parser.add_argument(
        "--profile", action="store_true", help="also profile one step (top operators) per variant"
    )
    parser.add_argument(
        "--reference",
        metavar="PATH",
        help=f"JSON of an earlier run whose {REFERENCE_FULL} / {REFERENCE_MATERIALISING} rows "
        "serve as the ratio baselines when this run does not measure them",
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    args.bf16 = args.bf16 or (args.device == "cuda" and not args.fp32)
    if args.variant:
        common.emit_result(_train(args))
        return 0
    return _parent(args)


if __name__ == "__main__":
    sys.exit(main())
