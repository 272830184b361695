"""Co-batched fine-tuning: fine-tunes per hour for K = 1, 2, 4, 8 jobs trained in one loop
(tuneqdm_core/cotrain.py), each K in a fresh process, side by side in one table.

    PYTHONPATH=. python benchmarks/cotrain.py [--ks 1 2 4 8] [--latent 8] [--bits 4]
        [--warmup 1] [--steps 2] [--device cpu|cuda] [--arch sd1] [--json PATH]

Model: the SD 1.x UNet architecture (public config, random weights), quantized, beside the
built-in tiny VAE (2× downsampling: photos are 2 × latent px) and a 2-layer CLIP text encoder
768 wide; ``--latent 64`` is SD's latent at 512 px. The real CoTrainer trains K TuneQDM
adapters, batch 1 each. A step trains every job once, so fine-tunes per hour =
K × 3600 / (step time × the default fine-tune length, FinetuneConfig().steps).
Memory: CPU peak RSS during the steps (high-water mark reset after loading and preparing),
GPU torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

# Shared cores: see benchmarks/train_memory.py.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from PIL import Image

from benchmarks import common
from tuneqdm_core import QuantConfig, quantize_
from tuneqdm_core.base import BaseModel
from tuneqdm_core.builtin.tiny import TINY_ARCHS, build_tiny_pipeline
from tuneqdm_core.cli.reports import table
from tuneqdm_core.cotrain import CoJob, CoTrainer
from tuneqdm_core.finetune import FinetuneConfig, Subject

FINETUNE_STEPS = FinetuneConfig().steps


def _photos(job: int, count: int = 2, size: int = 48) -> list[Image.Image]:
    """A coloured card per job with a square that moves a little between photos."""
    photos = []
    for i in range(count):
        array = np.zeros((size, size, 3), np.uint8)
        array[:, :] = (200, 30 + 20 * job, 30 + 10 * i)
        array[8:28, 10 + i : 30 + i] = (20, 20, 220)
        photos.append(Image.fromarray(array))
    return photos


def _base(args: argparse.Namespace, device: torch.device) -> BaseModel:
    pipeline = build_tiny_pipeline(resolution=2 * args.latent, arch=args.arch)
    quant = QuantConfig(bits=args.bits, range="minmax")
    quantize_(pipeline.unet, quant)
    for module in (pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
    return BaseModel(
        source="built-in sd1",
        unet=pipeline.unet.to(device).eval(),
        vae=pipeline.vae.to(device).eval(),
        text_encoder=pipeline.text_encoder.to(device).eval(),
        tokenizer=pipeline.tokenizer,
        scheduler_config=dict(pipeline.scheduler.config),
        quant=quant,
        device=device,
    )


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """K jobs in one CoTrainer in this process: load, prepare, step, measure."""
    device = torch.device(args.device)
    start = time.perf_counter()
    base = _base(args, device)
    load_seconds = time.perf_counter() - start
    trainer = CoTrainer(base)
    steps = args.warmup + args.steps
    for job in range(args.k):
        # More steps than measured: no job leaves while the group is timed.
        config = FinetuneConfig(steps=steps + 1, resolution=2 * args.latent, seed=job)
        trainer.add(CoJob(f"job{job}", [Subject(f"a photo of sks{job} dog", _photos(job))], config))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak_reset = True
    else:
        common.release_freed_memory()
        peak_reset = common.reset_peak_rss()
    times = []
    for _ in range(steps):
        step_start = time.perf_counter()
        left = trainer.step()
        common.sync(device)
        times.append(time.perf_counter() - step_start)
        assert not left, left
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else common.peak_rss_bytes()
    )
    trainer.close()
    step = common.median(times[args.warmup :])
    return {
        "k": args.k,
        "load_seconds": load_seconds,
        "step_seconds": step,
        "step_seconds_all": times,
        "finetunes_per_hour": args.k * 3600 / (step * FINETUNE_STEPS),
        "train_peak_bytes": peak,
        "train_peak_excludes_load": peak_reset,
    }


HEADER = ["K", "step s", "s per job-step", "fine-tunes/h", "× K=1", "train peak GiB", "mem × K=1"]


def _row(result: dict[str, Any], one: dict[str, Any]) -> list[object]:
    if "error" in result:
        return [result["k"], "failed: " + result["error"], *[""] * (len(HEADER) - 2)]
    return [
        result["k"],
        f"{result['step_seconds']:.2f}",
        f"{result['step_seconds'] / result['k']:.2f}",
        f"{result['finetunes_per_hour']:.2f}",
        common.ratio(result["finetunes_per_hour"], one.get("finetunes_per_hour")),
        f"{result['train_peak_bytes'] / common.GIB:.2f}",
        common.ratio(result["train_peak_bytes"], one.get("train_peak_bytes")),
    ]


def _parent(args: argparse.Namespace) -> int:
    child = [
        *("--latent", str(args.latent), "--bits", str(args.bits), "--arch", args.arch),
        *("--warmup", str(args.warmup), "--steps", str(args.steps), "--device", args.device),
    ]
    results = []
    start = time.perf_counter()
    for k in args.ks:
        k_start = time.perf_counter()
        result = common.run_child(Path(__file__), [*child, "--k", str(k)], args.timeout)
        result.setdefault("k", k)
        result["wall_seconds"] = time.perf_counter() - k_start
        results.append(result)
        status = result.get("error") or f"{result['step_seconds']:.2f} s/step"
        print(f"  K={k}: {status} ({result['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
    one = next((r for r in results if r["k"] == 1 and "error" not in r), {})
    memory = "peak RSS" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(
        f"Co-batched fine-tuning, {args.arch} UNet (random weights, w{args.bits}), latent "
        f"{args.latent}x{args.latent} ({8 * args.latent} px in SD), batch 1 per job, "
        f"fp32 on cpu / bf16 on cuda, median "
        f"of {args.steps} steps after {args.warmup} warm-up; fine-tunes/h at "
        f"{FINETUNE_STEPS} steps each; memory = {memory}"
    )
    print(f"machine: {common.machine()}")
    print(table(HEADER, [_row(r, one) for r in results]))
    if any(not r.get("train_peak_excludes_load", True) for r in results):
        print("warning: could not reset the peak RSS here; train peak includes the load peak")
    common.write_json(
        args.json,
        {
            "benchmark": "cotrain",
            "settings": {
                k: getattr(args, k)
                for k in ("ks", "latent", "bits", "warmup", "steps", "device", "arch")
            },
            "finetune_steps": FINETUNE_STEPS,
            "machine": common.machine(),
            "groups": results,
            "wall_seconds": time.perf_counter() - start,
        },
    )
    return 0 if all("error" not in r for r in results) else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--latent", type=int, default=8, help="latent side (SD px / 8)")
    parser.add_argument("--arch", default="sd1", choices=TINY_ARCHS, help="UNet architecture")
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (median reported)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds per K")
    parser.add_argument("--json", metavar="PATH", help="write all numbers here")
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)  # set in the child process
    args = parser.parse_args()
    if args.k:
        common.emit_result(_train(args))
        return 0
    return _parent(args)


if __name__ == "__main__":
    sys.exit(main())
