"""``tuneqdm export``: an adapter as a LoRA file or a merged float UNet (docs/library.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneqdm_core.cli.models import _base, add_base_arguments
from tuneqdm_core.export import FORMATS, ExportOptions, Interval, export_adapter, load_float_unet
from tuneqdm_core.serialization import load_adapter


def _interval(value: str) -> Interval:
    return value if value == "mean" else int(value)


def cmd_export(args: argparse.Namespace) -> int:
    options = ExportOptions(
        format=args.format,
        rank=args.rank,
        interval=args.interval,
        include_quantization_error=not args.without_quantization_error,
        fp16=args.fp16,
    )
    base = _base(args)
    adapter = load_adapter(args.adapter, base.unet)
    out = Path(args.out)
    if base.family is None:
        summary = export_adapter(base.unet, load_float_unet(args.model), adapter, out, options)
    else:  # a transformer family: its float transformer, its LoRA prefix and interval shares
        family = base.family
        summary = export_adapter(
            base.unet,
            family.load_float(args.model),
            adapter,
            out,
            options,
            prefix=family.lora_prefix,
            shares=family.interval_shares(base, adapter.config.intervals),
        )
    shown = {k: v for k, v in summary.items() if k != "layer_relative_errors"}
    print(f"{options.format} written to {out}: {json.dumps(shown)}")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "export", help="an adapter as a LoRA for diffusers, or merged into the float UNet"
    )
    add_base_arguments(p)
    defaults = ExportOptions()
    p.add_argument("--adapter", required=True, help="adapter file (.safetensors)")
    p.add_argument("--out", required=True, help="file (.safetensors) or folder (merged) to write")
    p.add_argument("--format", default=defaults.format, choices=FORMATS)
    p.add_argument("--rank", type=int, default=defaults.rank, help="LoRA rank (per layer)")
    p.add_argument(
        "--interval",
        type=_interval,
        default=defaults.interval,
        help="which timestep interval's weights: an index, or 'mean' (time-weighted mean)",
    )
    p.add_argument(
        "--without-quantization-error",
        action="store_true",
        help="LoRA of the adapter's change only, on top of the float weights",
    )
    p.add_argument("--fp16", action="store_true", help="half-precision tensors")
    p.set_defaults(run=cmd_export)
