"""``tuneqdm pretrain | check-model``: the built-in model, made and verified."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from tuneqdm_core.builtin.pretrain import PretrainConfig, pretrain, sample_grid, verify_checksums


def cmd_pretrain(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(PretrainConfig)}
    config = PretrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
    record = pretrain(
        args.out, config, device=args.device, data_dir=Path(args.data_dir), init=args.init
    )
    print(
        f"{record['steps_done']} steps in {record['seconds']:.0f} s; "
        f"loss {record['loss_first100']:.4f} → {record['loss_last100']:.4f}; written to {args.out}"
    )
    if args.samples:
        sample_grid(args.out, device=args.device).save(args.samples)
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
    p.add_argument("--steps", type=int, help=f"UNet steps (default {defaults.steps})")
    p.add_argument("--batch-size", type=int, help=f"default {defaults.batch_size}")
    p.add_argument("--lr", type=float, help=f"default {defaults.lr}")
    p.add_argument("--vae-steps", type=int, help=f"default {defaults.vae_steps}")
    p.add_argument("--ema-decay", type=float, help=f"default {defaults.ema_decay}")
    p.add_argument("--seed", type=int, help=f"default {defaults.seed}")
    p.add_argument("--max-minutes", type=float, help="stop and save after this long (0: never)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--init", metavar="DIR", help="train further a model this command wrote")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--samples", metavar="PNG", help="also draw a grid of samples to this file")
    p.set_defaults(run=cmd_pretrain)

    p = commands.add_parser("check-model", help="verify a model folder against its SHA256SUMS")
    p.add_argument("folder")
    p.set_defaults(run=cmd_check_model)
