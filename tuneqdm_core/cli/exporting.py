"""``tuneqdm export``: an adapter as a LoRA file (PEFT or kohya keys), a merged float UNet, or a
merged original-layout checkpoint (docs/library.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuneqdm_core.cli.models import add_base_arguments, base_from_args
from tuneqdm_core.export import (
    DEFAULT_RANK,
    FORMATS,
    ExportOptions,
    Interval,
    export_adapter,
    load_float_pipeline,
    load_float_unet,
)
from tuneqdm_core.serialization import load_adapter, read_metadata


def _interval(value: str) -> Interval:
    return value if value == "mean" else int(value)


def cmd_export(args: argparse.Namespace) -> int:
    options = ExportOptions(
        format=args.format,
        rank=args.rank,
        interval=args.interval,
        include_quantization_error=not args.without_quantization_error,
        fp16=args.fp16,
        max_relative_error=args.max_relative_error,
    )
    read_metadata(args.adapter)  # a bad adapter file fails before the base loads
    base = base_from_args(args)
    adapter = load_adapter(args.adapter, base.unet)
    out = Path(args.out)
    if base.family.denoiser == "unet":
        pipeline = None
        if options.format == "merged-checkpoint":
            pipeline = load_float_pipeline(args.model)
            float_unet = pipeline.unet
        else:
            float_unet = load_float_unet(args.model)
        summary = export_adapter(base.unet, float_unet, adapter, out, options, pipeline=pipeline)
    else:  # a transformer family: its float transformer, its LoRA prefix and interval shares
        family = base.family
        if options.format not in ("lora", "merged"):
            print(
                f"tuneqdm export: {options.format} is for SD 1.x/SDXL UNets; a "
                f"{family.name} base exports as lora or merged",
                file=sys.stderr,
            )
            return 2
        summary = export_adapter(
            base.unet,
            family.load_float(args.model, args.config),
            adapter,
            out,
            options,
            prefix=family.lora_prefix,
            shares=family.interval_shares(base, adapter.config.intervals),
        )
    hidden = ("layer_relative_errors", "layer_ranks", "warnings")
    shown = {k: v for k, v in summary.items() if k not in hidden}
    print(f"{options.format} written to {out}: {json.dumps(shown)}")
    for warning in summary["warnings"]:
        print(f"tuneqdm export: warning: {warning}", file=sys.stderr)
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "export",
        help="an adapter as a LoRA (diffusers/PEFT or kohya/A1111 keys), merged into the float "
        "UNet, or merged into a whole original-layout checkpoint",
    )
    add_base_arguments(p)
    defaults = ExportOptions()
    p.add_argument("--adapter", required=True, help="adapter file (.safetensors)")
    p.add_argument("--out", required=True, help="file (.safetensors) or folder (merged) to write")
    p.add_argument(
        "--format",
        default=defaults.format,
        choices=FORMATS,
        help="lora: PEFT keys (diffusers); lora-kohya: kohya/A1111 keys; merged: the UNet; "
        "merged-checkpoint: UNet, VAE and text encoders in one original-layout file",
    )
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=int, help=f"LoRA rank of every layer (default {DEFAULT_RANK})")
    rank.add_argument(
        "--max-relative-error",
        type=float,
        help="instead of --rank: per layer the smallest rank whose relative error stays within "
        "this (e.g. 0.05)",
    )
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
