"""``tuneqdm build-tiny | quantize | finetune | generate``: working with real model folders."""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from safetensors.torch import save_file
from tqdm.auto import tqdm

from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.builtin.tiny import TINY_ARCHS, save_tiny_pipeline
from tuneqdm_core.builtin.tiny_dit import DIT_ARCHS, save_tiny_dit
from tuneqdm_core.families.flow import SCHEDULERS as FLOW_SCHEDULERS
from tuneqdm_core.families.flow import TEXT_ENCODER_BITS
from tuneqdm_core.finetune import FinetuneConfig, Progress, Subject, finetune
from tuneqdm_core.generate import SCHEDULERS, GenerationRequest, Precision, generate
from tuneqdm_core.images import open_image
from tuneqdm_core.model import QuantConfig
from tuneqdm_core.serialization import load_adapter, read_metadata, save_adapter

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


CACHE_ENV = "TUNEQDM_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where the CLI keeps quantized bases (and class images) unless told otherwise:
    ``$TUNEQDM_CACHE_DIR``, else ``$XDG_CACHE_HOME/tuneqdm``, else ``~/.cache/tuneqdm``, so
    no command quantizes the same base twice."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tuneqdm"


def add_base_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="a diffusers model folder or hub id (SD 1.x / 2.x, SDXL, FLUX.1, SD3 layout), "
        "or one .safetensors/.ckpt checkpoint",
    )
    parser.add_argument(
        "--config",
        help="for a single-file model: the diffusers folder or hub id it is read with "
        "(configs, tokenizer, scheduler; for a FLUX/SD3 transformer file also the VAE and "
        "text encoders, and required); default for an SD/SDXL checkpoint: inferred from the "
        "checkpoint by diffusers",
    )
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument(
        "--text-encoder-bits",
        type=int,
        choices=TEXT_ENCODER_BITS,
        help="FLUX / SD3: keep the T5 encoder as 8-bit codes (a quarter of its fp32 memory); "
        "default: float",
    )
    parser.add_argument(
        "--cache-dir",
        help=f"keep the quantized UNet here for the next start (default: ${CACHE_ENV}, else "
        "$XDG_CACHE_HOME/tuneqdm, else ~/.cache/tuneqdm)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="quantize afresh and keep nothing on disk"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def cache_dir(args: argparse.Namespace) -> Path | None:
    """The cache folder a command uses (None with ``--no-cache``)."""
    if args.no_cache:
        return None
    return Path(args.cache_dir) if args.cache_dir else default_cache_dir()


def base_from_args(args: argparse.Namespace) -> BaseModel:
    base = load_base(
        args.model,
        quant=QuantConfig(bits=args.bits),
        cache_dir=cache_dir(args),
        device=args.device,
        config=args.config,
        text_encoder_bits=args.text_encoder_bits,
    )
    origin = "from cache" if base.from_cache else "quantized now"
    print(f"base {args.model} W{args.bits} ({origin}) in {base.load_seconds:.2f} s")
    return base


def cmd_build_tiny(args: argparse.Namespace) -> int:
    if args.arch in DIT_ARCHS:
        path = save_tiny_dit(args.out, args.arch, seed=args.seed, resolution=args.resolution)
        print(f"tiny {args.arch} pipeline written to {path}")
        return 0
    path = save_tiny_pipeline(args.out, seed=args.seed, resolution=args.resolution, arch=args.arch)
    print(f"tiny Stable Diffusion pipeline written to {path}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    base = base_from_args(args)
    print(f"fingerprint {base.fingerprint}")
    return 0


def image_paths(paths: list[str]) -> list[Path]:
    """Files as given; folders expanded to the image files they hold (sorted)."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return found


# What a None default means, where the flag's default alone would not say.
_NONE_MEANS = {
    "lr_s_out": "2e-3 x the base's median quantization step",
    "gradient_checkpointing": "on for CUDA, off elsewhere",
}


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`FinetuneConfig` field, its type, choices and default read from
    the dataclass (the core's config is the one source of the training options)."""
    hints = get_type_hints(FinetuneConfig)
    for option in fields(FinetuneConfig):
        flag = f"--{option.name.replace('_', '-')}"
        kind = hints[option.name]
        shown = "default: " + _NONE_MEANS.get(option.name, "%(default)s")
        if get_origin(kind) is Literal:
            p.add_argument(flag, default=option.default, choices=get_args(kind), help=shown)
        elif kind in (bool, bool | None):
            action = argparse.BooleanOptionalAction
            p.add_argument(flag, default=option.default, action=action, help=shown)
        else:
            scalar = next(t for t in (get_args(kind) or (kind,)) if t is not type(None))
            p.add_argument(flag, type=scalar, default=option.default, help=shown)


def cmd_finetune(args: argparse.Namespace) -> int:
    subjects = [Subject(p, image_paths([d]), args.class_prompt) for p, d in args.subject or []]
    if args.images:
        if not args.prompt:
            raise ValueError("--images needs --prompt (e.g. 'a photo of sks dog')")
        subjects.insert(0, Subject(args.prompt, image_paths(args.images), args.class_prompt))
    if not subjects:
        raise ValueError("give --images with --prompt, or --subject PROMPT FOLDER")
    config = FinetuneConfig(**{f.name: getattr(args, f.name) for f in fields(FinetuneConfig)})
    # Every photo is read before the base is loaded (which can take a minute to quantize):
    # a bad photo fails at once.
    for subject in subjects:
        for photo in subject.images:
            open_image(photo)
    base = base_from_args(args)
    with tqdm(total=config.steps, desc="fine-tune", unit="step") as bar:

        def show(p: Progress) -> None:
            bar.n = p.step
            bar.set_postfix(loss=f"{p.loss:.4f}")
            bar.refresh()

        result = finetune(
            base,
            subjects,
            config,
            checkpoint_dir=args.checkpoint_dir,
            cache_dir=cache_dir(args),
            progress=show,
        )
    out = Path(args.out)
    if result.adapter is not None:
        tokens = [s.instance_prompt for s in subjects]
        save_adapter(result.adapter, out, extra={"prompts": tokens, "base_model": args.model})
        print(f"adapter written to {out} ({out.stat().st_size / 1e6:.2f} MB)")
    elif result.lora is not None:
        save_file(result.lora.tensors(base.family.denoiser), str(out))
        print(f"LoRA (rank {result.lora.rank}, PEFT keys) written to {out}")
    elif result.unet is not None:
        result.unet.save_pretrained(out)
        print(f"fine-tuned float {base.family.denoiser} written to {out}/")
    print(f"{len(result.losses)} steps in {result.seconds:.1f} s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.adapter:
        read_metadata(args.adapter)  # a bad adapter file fails before the base loads
    base = base_from_args(args)
    adapter = load_adapter(args.adapter, base.unet, device=base.device) if args.adapter else None
    request = GenerationRequest(
        prompt=args.prompt,
        adapter=adapter,
        negative_prompt=args.negative_prompt,
        num_images=args.num_images,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=args.steps, desc="generate", unit="step") as bar:
        images = generate(
            base, [request], on_step=lambda step, _: bar.update(1), precision=args.precision
        )[0]
    for generated in images:
        path = out / f"{generated.seed}.png"
        generated.image.save(path)
        print(path)
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser("build-tiny", help="write the built-in tiny SD pipeline to a folder")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument(
        "--arch",
        default="tiny-sd1",
        choices=TINY_ARCHS + DIT_ARCHS,
        help="UNet shape; sd1/sd2 = the real UNet architecture, random weights; tiny-sdxl = "
        "the SDXL layout (two text encoders, added conditioning); tiny-flux / tiny-sd3 = "
        "FLUX.1 / SD3.5 layouts (flow-matching transformers, T5 and CLIP encoders)",
    )
    p.add_argument(
        "--xl", dest="arch", action="store_const", const="tiny-sdxl", help="= --arch tiny-sdxl"
    )
    p.set_defaults(run=cmd_build_tiny)

    p = commands.add_parser("quantize", help="quantize a model's UNet (and cache it)")
    add_base_arguments(p)
    p.set_defaults(run=cmd_quantize)

    p = commands.add_parser("finetune", help="fine-tune an adapter on subject photos")
    add_base_arguments(p)
    p.add_argument("--images", nargs="+", help="photos of the subject (files or folders)")
    p.add_argument("--prompt", help="instance prompt with the identifier, 'a photo of sks dog'")
    p.add_argument(
        "--subject",
        nargs=2,
        action="append",
        metavar=("PROMPT", "FOLDER"),
        help="one more subject for the same adapter (repeatable)",
    )
    p.add_argument("--class-prompt", help="turns on prior preservation, 'a photo of a dog'")
    p.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    add_config_arguments(p)
    p.add_argument("--checkpoint-dir", help="save/resume training state here")
    p.set_defaults(run=cmd_finetune)

    p = commands.add_parser("generate", help="generate images, with an adapter or the base")
    add_base_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--adapter", help="adapter file (.safetensors); none = the base model")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--height", type=int, default=512)
    p.add_argument(
        "--scheduler",
        default="ddim",
        choices=sorted(set(SCHEDULERS) | set(FLOW_SCHEDULERS)),
        help="UNet models: ddim, dpmsolver++, euler; FLUX: euler; SD3: euler, heun, "
        "dpmsolver++ (default ddim = a transformer family's euler)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=get_args(Precision),
        help="autocast dtype; auto: bf16 on CUDA, fp32 on CPU",
    )
    p.set_defaults(run=cmd_generate)
