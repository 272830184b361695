"""The ``tuneqdm`` command: build or pretrain a model, quantize, fine-tune, generate, export,
evaluate, inspect."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

# Set before transformers is first imported (by the commands below): its notices about optional
# backends (torchvision's image processors, which nothing here uses) are not the user's concern.
# Errors still show; TRANSFORMERS_VERBOSITY set by the user wins.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tuneqdm_core.cli import evaluate, exporting, models, pretraining, reports
from tuneqdm_core.configs import UNET_CONFIGS
from tuneqdm_core.images import ImageError
from tuneqdm_core.serialization import AdapterFileError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tuneqdm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    models.add_commands(commands)
    pretraining.add_commands(commands)
    evaluate.add_commands(commands)
    exporting.add_commands(commands)

    p = commands.add_parser("sizes", help="bytes of a quantized UNet and of its adapter files")
    p.add_argument("--arch", default="sd1", choices=sorted(UNET_CONFIGS))
    p.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    p.add_argument("--range", default="auto", choices=["auto", "minmax", "mse"])
    p.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--json", metavar="PATH", help="also write the numbers (bytes) as JSON")
    p.set_defaults(run=reports.cmd_sizes)

    p = commands.add_parser("inspect", help="print an adapter file's metadata")
    p.add_argument("path")
    p.set_defaults(run=reports.cmd_inspect)

    p = commands.add_parser("demo", help="quantize, fine-tune, save, load and swap on a tiny UNet")
    p.add_argument("--steps", type=int, default=30)
    p.set_defaults(run=reports.cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (AdapterFileError, ImageError, OSError, ValueError) as error:
        print(f"tuneqdm {args.command}: error: {error}", file=sys.stderr)
        return 2
