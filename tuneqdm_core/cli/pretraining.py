"""``tuneqdm pretrain | check-model``: the built-in model, made and verified."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from tuneqdm_core.builtin.pretrain import PretrainConfig, pretrain, sample_grid, verify_checksums
from tuneqdm_core.builtin.pretrain_flux import FluxPretrainConfig, pretrain_flux, sample_grid_flux

# The config options the command line takes (each family's config has some of them).
OPTION_NAMES = {"steps", "batch_size", "lr", "vae_steps", "ema_decay", "seed", "max_minutes"}


def cmd_pretrain(args: argparse.Namespace) -> int:
    config_class: Any = FluxPretrainConfig if args.family == "flux" else PretrainConfig
    names = {f.name for f in fields(config_class)}
    given = {k: v for k, v in vars(args).items() if v is not None}
    if unused := sorted(k for k in given.keys() & OPTION_NAMES if k not in names):
        options = ", ".join("--" + k.replace("_", "-") for k in unused)
        raise SystemExit(f"--family {args.family} takes no {options}")
    config = config_class(**{k: v for k, v in given.items() if k in names})
    if args.family == "flux":
        record = pretrain_flux(
            args.out,
            config,
            device=args.device,
            data_dir=Path(args.data_dir),
            init=args.init,
            init_vae=args.init_vae,
        )
    else:
        if args.init_vae is not None:
            raise SystemExit("--init-vae is for --family flux")
        record = pretrain(
            args.out, config, device=args.device, data_dir=Path(args.data_dir), init=args.init
        )
    print(
        f"{record['steps_done']} steps in {record['seconds']:.0f} s; "
        f"loss {record['loss_first100']:.4f} → {record['loss_last100']:.4f}; written to {args.out}"
    )
    if args.samples:
        draw = sample_grid_flux if args.family == "flux" else sample_grid
        draw(args.out, device=args.device).save(args.samples)
        print(f"samples written to {args.samples}")
    return 0


def cmd_check_model(args: argparse.Namespace) -> int:
    changed = verify_checksums(args.folder)
    for name in changed:
        print(f"changed, missing or not listed: {name}")
    print("intact" if not changed else f"{len(changed)} file(s) differ from SHA256SUMS")
    return 0 if not changed else 1


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    defaults = PretrainConfig()
    p = commands.add_parser(
        "pretrain", help="pretrain the built-in text-to-image model on Fashion-MNIST scenes"
    )
    p.add_argument("out", help="folder to write the diffusers model to")
    p.add_argument(
        "--family",
        choices=("sd", "flux"),
        default="sd",
        help="sd: models/fashion-sd's kind (UNet); flux: a FLUX-family transformer (FluxPipeline)",
    )
    p.add_argument("--steps", type=int, help=f"UNet steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, help=f"default {defaults.lr}")
    p.add_argument("--vae-steps", type=int, help=f"sd only; default {defaults.vae_steps}")
    p.add_argument("--ema-decay", type=float, help=f"default {defaults.ema_decay}")
    p.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    p.add_argument("--max-minutes", type=float, help="stop and save after this long (0: never)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--init", metavar="DIR", help="train further a model this command wrote")
    p.add_argument(
        "--init-vae",
        metavar="DIR",
        help="flux: take the VAE, CLIP text encoder and tokenizer of this fashion-sd folder",
    )
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--samples", metavar="PNG", help="also draw a grid of samples to this file")
    p.set_defaults(run=cmd_pretrain)

    p = commands.add_parser("check-model", help="verify a model folder against its SHA256SUMS")
    p.add_argument("folder")
    p.set_defaults(run=cmd_check_model)
