"""Adapter overhead in generation on the FLUX/SD3 transformers: one transformer call (what each
sampling step runs) on the quantized base with no adapter ("bare") and routed through a
2-interval TuneQDM adapter whose scales moved away from the base ("adapter"), side by side.

    PYTHONPATH=. python benchmarks/dit_overhead.py [--arch flux|sd3|tiny-flux|tiny-sd3]
        [--full-depth] [--latent 32] [--device cpu|cuda] [--reps 5] [--json PATH]

``--latent`` is the side of the grid of latent tokens (FLUX at 512 px: 32). Without
``--full-depth`` the model is the subset of blocks of benchmarks/dit_blocks.py; with it the
whole transformer, built on the device in the compute dtype and quantized layer by layer
(the text encoders are never built). bf16 autocast on cuda, fp32 on cpu.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

from benchmarks import common, dit_blocks
from benchmarks.serving import _trained_adapter
from tuneqdm_core import route_adapters, routed
from tuneqdm_core.cli.reports import table
from tuneqdm_core.families.flow import FlowFamily


def _seconds(call: Any, reps: int, device: torch.device) -> list[float]:
    call()  # warm-up
    common.sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        call()
        common.sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="flux", choices=sorted(dit_blocks.CONFIGS))
    parser.add_argument("--full-depth", action="store_true")
    parser.add_argument("--latent", type=int, default=16, help="side of the latent token grid")
    parser.add_argument("--text-tokens", type=int, default=dit_blocks.TEXT_TOKENS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    torch.manual_seed(0)
    model = dit_blocks.build_quantized(
        args.arch, args.full_depth, device, torch.bfloat16 if bf16 else torch.float32
    )
    model.eval()
    adapter = _trained_adapter(model, seed=1)
    generator = torch.Generator(device).manual_seed(0)
    kwargs, _, sigmas = dit_blocks.flow_inputs(
        model, 1, args.latent, generator, device, text_tokens=args.text_tokens
    )
    route = route_adapters([adapter], torch.tensor(FlowFamily.tas_timesteps(sigmas)))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def bare() -> None:
        with torch.inference_mode(), autocast:
            model(**kwargs)

    def with_adapter() -> None:
        with torch.inference_mode(), autocast, routed(model, route):
            model(**kwargs)

    times = {"bare": _seconds(bare, args.reps, device)}
    times["adapter"] = _seconds(with_adapter, args.reps, device)
    medians = {name: common.median(t) for name, t in times.items()}
    depth = "full depth" if args.full_depth else "subset of blocks (benchmarks/dit_blocks.py)"
    print(
        f"One transformer call, {args.arch} ({depth}), W4 packed, {args.latent}x{args.latent} "
        f"latent tokens, text {args.text_tokens} tokens, batch 1, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, median of {args.reps}"
    )
    print(f"machine: {common.machine()}")
    rows = [
        [name, f"{1000 * m:.1f}", common.ratio(m, medians["bare"])] for name, m in medians.items()
    ]
    print(table(["mode", "ms per call", "x bare"], rows))
    common.write_json(
        args.json,
        {
            "benchmark": "dit_overhead",
            "settings": vars(args),
            "machine": common.machine(),
            "seconds": times,
            "overhead": medians["adapter"] / medians["bare"] - 1,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
