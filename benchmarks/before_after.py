"""A subject before and after fine-tuning, as one picture (README, docs/builtin-model.md).

    PYTHONPATH=. python benchmarks/before_after.py --out docs/before-after.png

Takes the quality benchmark's subjects (Fashion-MNIST test garments the built-in model never
saw, 5 photos each), fine-tunes the built-in model on each with the `tuneqdm` CLI, and draws one
row per subject: its photos | the quantized base alone | the base with the adapter, the last two
for the same prompts and seeds. Needs Debian's dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from benchmarks import common
from benchmarks.subjects import DEFAULT_MODEL, NEW_CONTEXTS, SubjectItem, pick_subjects
from tuneqdm_core.cli import main as tuneqdm
from tuneqdm_core.images import to_pil

CELL = 96  # 32 px images drawn 3× larger, nearest neighbour, so the pixels stay visible
GAP = 16  # between the three groups
HEADER = 20


def _cli(argv: list[str]) -> None:
    if tuneqdm(argv) != 0:
        raise SystemExit(f"tuneqdm {' '.join(argv)} failed")


def _generate(
    model: str, prompt: str, seed: int, out: Path, args: argparse.Namespace, adapter: Path | None
) -> Image.Image:
    argv = [
        "generate", model, "--bits", str(args.bits), "--cache-dir", str(args.cache_dir),
        "--prompt", prompt, "--seed", str(seed), "--width", "32", "--height", "32",
        "--steps", str(args.sample_steps), "--guidance-scale", str(args.guidance),
        "--out", str(out),
    ]  # fmt: skip
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    _cli(argv)
    return Image.open(out / f"{seed}.png").convert("RGB")


def subject_row(
    subject: SubjectItem, work: Path, args: argparse.Namespace
) -> list[list[Image.Image]]:
    """[photos, base images, adapter images] of one subject."""
    photo_dir = work / subject.name / "photos"
    photo_dir.mkdir(parents=True)
    photos = to_pil(torch.stack(subject.photos))
    for i, photo in enumerate(photos):
        photo.save(photo_dir / f"{i:02d}.png")
    adapter = work / subject.name / "adapter.safetensors"
    argv = [
        "finetune", args.model, "--bits", str(args.bits), "--cache-dir", str(args.cache_dir),
        "--images", str(photo_dir), "--prompt", subject.instance_prompt, "--resolution", "32",
        "--steps", str(args.steps), "--seed", "0", "--out", str(adapter),
    ]  # fmt: skip
    _cli(argv)
    prompts = [subject.prompt(colour, where) for colour, where in NEW_CONTEXTS[: args.prompts]]
    before, after = [], []
    for i, prompt in enumerate(prompts):
        print(prompt)
        out = work / subject.name / f"prompt-{i}"
        before.append(_generate(args.model, prompt, args.seed, out / "base", args, None))
        after.append(_generate(args.model, prompt, args.seed, out / "adapter", args, adapter))
    return [photos, before, after]


def compose(rows: Sequence[list[list[Image.Image]]], titles: Sequence[str]) -> Image.Image:
    """Groups side by side with a title over each; one line per subject."""
    widths = [len(group) * CELL for group in rows[0]]
    width = sum(widths) + GAP * (len(widths) - 1)
    canvas = Image.new("RGB", (width, HEADER + len(rows) * (CELL + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    left = 0
    for title, group_width in zip(titles, widths, strict=True):
        draw.text((left + 2, 4), title, fill="black")
        left += group_width + GAP
    for r, row in enumerate(rows):
        top, left = HEADER + r * (CELL + 4), 0
        for group in row:
            for image in group:
                canvas.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (left, top))
                left += CELL
            left += GAP
    return canvas


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/before-after.png")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--subjects", type=int, default=2, help="rows: bag, sneaker, dress, ...")
    parser.add_argument("--prompts", type=int, default=3, help=f"at most {len(NEW_CONTEXTS)}")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps")
    parser.add_argument("--sample-steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(common.REPO_ROOT / "var" / "cache"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [subject_row(s, Path(tmp), args) for s in pick_subjects(args.subjects)]
    titles = ["subject photos", "base model", f"with the adapter (W{args.bits})"]
    compose(rows, titles).save(args.out)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
