"""Each export format against the adapter it came from: its error and its file's size.

    PYTHONPATH=. python benchmarks/export_formats.py [--model models/fashion-sd] [--steps 120]
        [--cache-dir var/cache] [--json PATH]

Fine-tunes a TuneQDM adapter (W4, the service's default recipe) on the built-in model with four
photos of a dark bag on red, blue, yellow and green backgrounds, then writes it in every format
of ``tuneqdm_core.export`` and prints, per file: the relative error of its weights against the
adapter's (``‖D − B·A‖ / ‖D‖`` for a LoRA, the rounding of a merge to fp16), the LoRA ranks and
the file's size. Fixed ranks and ``max_relative_error`` side by side, in one run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from benchmarks import common
from benchmarks.subjects import DEFAULT_MODEL
from tuneqdm_core.base import load_base
from tuneqdm_core.builtin.scenes import SIZE
from tuneqdm_core.cli.reports import table
from tuneqdm_core.export import ExportOptions, export_adapter, load_float_pipeline
from tuneqdm_core.finetune import FinetuneConfig, Subject, finetune
from tuneqdm_core.model import QuantConfig

BACKGROUNDS = ((200, 40, 40), (40, 60, 200), (220, 200, 40), (40, 170, 60))
OPTIONS = [
    ExportOptions(format="lora", rank=4),
    ExportOptions(format="lora", rank=16),
    ExportOptions(format="lora", rank=64),
    ExportOptions(format="lora", max_relative_error=0.2),
    ExportOptions(format="lora", max_relative_error=0.05),
    ExportOptions(format="lora-kohya", rank=16),
    ExportOptions(format="lora-kohya", max_relative_error=0.05),
    ExportOptions(format="merged", fp16=True),
    ExportOptions(format="merged-checkpoint", fp16=True),
]


def bag_photos(size: int = 2 * SIZE) -> list[Image.Image]:
    """A dark bag (a body and a handle) on each background, a little shifted per photo."""
    photos = []
    for i, colour in enumerate(BACKGROUNDS):
        image = Image.new("RGB", (size, size), colour)
        draw = ImageDraw.Draw(image)
        x, y = size // 4 + 2 * i, size // 3 + i
        draw.rectangle((x, y, x + size // 2, y + size // 2), fill=(30, 25, 20))
        draw.arc(
            (x + size // 8, y - size // 6, x + 3 * size // 8, y + size // 6),
            180,
            360,
            fill=(30, 25, 20),
            width=3,
        )
        photos.append(image)
    return photos


def _describe(options: ExportOptions) -> str:
    if options.format not in ("lora", "lora-kohya"):
        return "-"
    if options.max_relative_error is not None:
        return f"max_relative_error {options.max_relative_error}"
    return f"rank {options.lora_rank}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--cache-dir", help="keep the quantized base here for the next run")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"machine: {common.machine()}; model {args.model}", flush=True)
    base = load_base(args.model, quant=QuantConfig(bits=4), cache_dir=args.cache_dir)
    print(f"base loaded ({time.perf_counter() - start:.0f} s)", flush=True)
    config = FinetuneConfig(steps=args.steps, resolution=SIZE, seed=0)
    subject = Subject("a photo of sks bag", bag_photos())
    adapter = finetune(base, [subject], config).adapter
    assert adapter is not None
    print(f"fine-tuned {args.steps} steps ({time.perf_counter() - start:.0f} s)", flush=True)
    pipeline = load_float_pipeline(args.model)
    rows: list[list[object]] = []
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for i, options in enumerate(OPTIONS):
            work = copy.deepcopy(pipeline)  # a merge writes into the float UNet
            out = Path(folder) / f"{i}.safetensors"
            summary = export_adapter(base.unet, work.unet, adapter, out, options, pipeline=work)
            ranks = summary.get("layer_ranks") or {}
            shown = f"{min(ranks.values())}–{max(ranks.values())}" if ranks else "-"
            if not ranks and options.format in ("lora", "lora-kohya"):
                shown = str(summary["rank"])
            rows.append(
                [
                    options.format,
                    _describe(options),
                    shown,
                    f"{summary['relative_error']:.4f}",
                    f"{summary['bytes'] / 1e6:.2f}",
                    "yes" if summary["warnings"] else "",
                ]
            )
            results.append(
                {
                    "format": options.format,
                    "rank": options.lora_rank if options.format.startswith("lora") else None,
                    "max_relative_error": options.max_relative_error,
                    "layer_ranks": [min(ranks.values()), max(ranks.values())] if ranks else None,
                    "relative_error": summary["relative_error"],
                    "bytes": summary["bytes"],
                    "warned": bool(summary["warnings"]),
                }
            )
            print(rows[-1], flush=True)
    header = ["format", "asked", "layer ranks", "relative error", "MB", "warning"]
    print(table(header, rows))
    print(f"adapter: {args.steps} steps, 1 interval; total {time.perf_counter() - start:.0f} s")
    common.write_json(
        args.json,
        {
            "benchmark": "export_formats",
            "machine": common.machine(),
            # Where files were kept does not change a number.
            "settings": {k: v for k, v in vars(args).items() if k not in ("json", "cache_dir")},
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
