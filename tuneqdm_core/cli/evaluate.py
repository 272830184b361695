"""``tuneqdm evaluate``: DINO, CLIP-I and CLIP-T of adapters on a DreamBooth-style dataset.

Each ``--subject NAME=[ADAPTER][:CLASS[:TOKEN]]`` names a folder ``DATASET/NAME`` of real
photos and the adapter that was trained on them. For every prompt template the adapter
generates ``--images-per-prompt`` images of "TOKEN CLASS"; they are scored against the photos
(DINO, CLIP-I) and against the prompt without TOKEN (CLIP-T). ``--out`` keeps the images as
``OUT/NAME/prompt-NN/SEED.png`` (NN: the template's 0-based line) and writes
``OUT/results.json``; ``--generated DIR`` scores images already laid out that way instead of
generating them.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.cli.models import image_paths
from tuneqdm_core.cli.reports import table
from tuneqdm_core.evaluation import (
    DREAMBOOTH_PROMPTS,
    SubjectScores,
    load_clip,
    load_dino,
    mean_scores,
    score_subject,
    strip_identifier,
)
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.images import open_image
from tuneqdm_core.model import QuantConfig
from tuneqdm_core.serialization import load_adapter

DEFAULT_TOKEN = "sks"
PROMPT_FOLDER = re.compile(r"prompt-(\d+)")


@dataclass(frozen=True)
class SubjectSpec:
    name: str  # folder under --dataset
    adapter: Path | None  # None: the plain quantized base
    class_word: str
    token: str

    def subject_prompt(self, template: str) -> str:
        return template.format(f"{self.token} {self.class_word}")


def default_class_word(name: str) -> str:
    """A guess from DreamBooth's folder names: "dog2" → "dog", "rc_car" → "rc car"."""
    return re.sub(r"\d+$", "", name).replace("_", " ").strip() or name


def parse_subject(spec: str) -> SubjectSpec:
    """``NAME=[ADAPTER][:CLASS[:TOKEN]]``; a bare ``NAME`` means no adapter."""
    name, has_adapter, rest = spec.partition("=")
    parts = rest.split(":") if has_adapter else [""]
    if not name or ":" in name or "/" in name or len(parts) > 3:
        raise ValueError(
            f"--subject {spec!r}: expected NAME=[ADAPTER][:CLASS[:TOKEN]], e.g. "
            f"'dog=adapters/dog.safetensors:dog:sks' (NAME is a folder of --dataset)"
        )
    adapter, class_word, token = [*parts, "", ""][:3]
    token = token or DEFAULT_TOKEN
    if len(token.split()) != 1:
        raise ValueError(f"--subject {spec!r}: TOKEN must be one word, got {token!r}")
    return SubjectSpec(
        name=name,
        adapter=Path(adapter) if adapter else None,
        class_word=class_word or default_class_word(name),
        token=token,
    )


def read_prompts(path: str | None) -> list[str]:
    """Templates, one a line with ``{}`` for "TOKEN CLASS"; blank lines and ``#`` lines skipped."""
    if path is None:
        return list(DREAMBOOTH_PROMPTS)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--prompts {file}: no such file")
    templates = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.count("{}") != 1:
            raise ValueError(
                f"{file}:{number}: a template needs exactly one '{{}}' where 'TOKEN CLASS' "
                f"goes, e.g. 'a {{}} on the beach'; got {line!r}"
            )
        templates.append(line)
    if not templates:
        raise ValueError(f"--prompts {file}: no templates in the file")
    return templates


def real_photos(dataset: Path, name: str) -> list[Image.Image]:
    folder = dataset / name
    if not folder.is_dir():
        known = sorted(p.name for p in dataset.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"--dataset {dataset} has no subject folder {name!r}; it has {known}"
        )
    paths = image_paths([str(folder)])
    if not paths:
        raise ValueError(f"{folder}: no images (.jpg, .png, ...) of subject {name!r}")
    return [open_image(p) for p in paths]


def read_generated(
    root: Path, spec: SubjectSpec, templates: list[str]
) -> tuple[list[Image.Image], list[str], int]:
    """Images under ``root/NAME/prompt-NN/``, their subject prompts, the prompt count."""
    folder = root / spec.name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--generated {root} has no folder {spec.name!r}; expected "
            f"{root}/{spec.name}/prompt-00/*.png, one folder per prompt template"
        )
    images: list[Image.Image] = []
    prompts: list[str] = []
    used = 0
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        match = PROMPT_FOLDER.fullmatch(sub.name)
        if match is None:
            continue
        index = int(match.group(1))
        if index >= len(templates):
            raise ValueError(
                f"{sub}: prompt {index} but only {len(templates)} templates; pass the --prompts "
                f"file the images were generated with"
            )
        paths = image_paths([str(sub)])
        images += [open_image(p) for p in paths]
        prompts += [spec.subject_prompt(templates[index])] * len(paths)
        used += bool(paths)
    if not images:
        raise ValueError(f"{folder}: no images in prompt-NN folders")
    return images, prompts, used


def generate_images(
    base: BaseModel, spec: SubjectSpec, templates: list[str], args: argparse.Namespace
) -> tuple[list[Image.Image], list[str]]:
    """``--images-per-prompt`` images per template (seeds ``--seed``, ``--seed`` + 1, ...),
    saved under ``--out`` when given."""
    adapter = load_adapter(spec.adapter, base.unet, device=base.device) if spec.adapter else None
    images: list[Image.Image] = []
    prompts: list[str] = []
    for index, template in enumerate(tqdm(templates, desc=spec.name, unit="prompt")):
        prompt = spec.subject_prompt(template)
        request = GenerationRequest(
            prompt=prompt,
            adapter=adapter,
            num_images=args.images_per_prompt,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            width=args.size,
            height=args.size,
        )
        # One prompt a loop: a batch of all 25 × 4 images at 512 px would not fit a GPU.
        for generated in generate(base, [request])[0]:
            if args.out:
                folder = Path(args.out) / spec.name / f"prompt-{index:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                generated.image.save(folder / f"{generated.seed}.png")
            images.append(generated.image)
            prompts.append(prompt)
    return images, prompts


def _check_inputs(args: argparse.Namespace, specs: list[SubjectSpec]) -> None:
    """Every path a user gave, checked before minutes of model loading."""
    if not Path(args.dataset).is_dir():
        raise FileNotFoundError(f"--dataset {args.dataset}: no such folder")
    if args.generated:
        if not Path(args.generated).is_dir():
            raise FileNotFoundError(f"--generated {args.generated}: no such folder")
        return
    if args.model is None:
        raise ValueError("give the model folder to generate with, or --generated DIR to score")
    for spec in specs:
        if spec.adapter is not None and not spec.adapter.is_file():
            raise FileNotFoundError(f"--subject {spec.name}: adapter file {spec.adapter} not found")
    if args.images_per_prompt < 1 or args.steps < 1:
        raise ValueError("--images-per-prompt and --steps must be at least 1")


def cmd_evaluate(args: argparse.Namespace) -> int:
    specs = [parse_subject(s) for s in args.subject]
    if len({s.name for s in specs}) != len(specs):
        raise ValueError("each --subject NAME may be given once")
    templates = read_prompts(args.prompts)
    _check_inputs(args, specs)
    dataset = Path(args.dataset)
    photos = {spec.name: real_photos(dataset, spec.name) for spec in specs}
    clip = load_clip(args.clip, args.device)
    dino = load_dino(args.dino, args.device)

    base = None
    if not args.generated:
        base = load_base(
            args.model,
            quant=QuantConfig(bits=args.bits),
            cache_dir=args.cache_dir,
            device=args.device,
        )
        print(f"base {args.model} W{args.bits} in {base.load_seconds:.2f} s")

    rows: list[SubjectScores] = []
    for spec in specs:
        if base is None:
            images, prompts, prompt_count = read_generated(Path(args.generated), spec, templates)
        else:
            images, prompts = generate_images(base, spec, templates, args)
            prompt_count = len(templates)
        rows.append(
            score_subject(
                clip=clip,
                dino=dino,
                subject=spec.name,
                adapter=spec.adapter.name if spec.adapter else "base",
                real=photos[spec.name],
                generated=images,
                prompts=[strip_identifier(p, spec.token) for p in prompts],
                prompt_count=prompt_count,
            )
        )
    mean = mean_scores(rows)
    header = ["subject", "adapter", "prompts", "images", "DINO", "CLIP-I", "CLIP-T"]
    print(
        table(
            header,
            [
                [r.subject, r.adapter, r.prompts, r.images]
                + [f"{v:.3f}" for v in (r.dino, r.clip_i, r.clip_t)]
                for r in [*rows, mean]
            ],
        )
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        names = "model bits clip dino dataset generated subject"
        names += " images_per_prompt steps guidance size seed"
        settings = {name: getattr(args, name) for name in names.split()}
        report = {
            "subjects": [asdict(r) for r in rows],
            "mean": asdict(mean),
            "prompts": templates,
            "settings": settings,
        }
        (out / "results.json").write_text(json.dumps(report, indent=2))
        print(f"results written to {out / 'results.json'}")
    return 0


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "evaluate", help="DINO, CLIP-I and CLIP-T of adapters on a DreamBooth-style dataset"
    )
    p.add_argument(
        "model", nargs="?", help="diffusers model folder or hub id; not needed with --generated"
    )
    p.add_argument("--bits", type=int, default=4, choices=[4, 8])
    p.add_argument("--cache-dir", help="keep the quantized UNet here for the next start")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--clip", required=True, metavar="DIR", help="local CLIPModel folder")
    p.add_argument("--dino", required=True, metavar="DIR", help="local DINO ViT folder")
    p.add_argument("--dataset", required=True, metavar="DIR", help="one photo folder a subject")
    p.add_argument(
        "--subject",
        required=True,
        action="append",
        metavar="NAME=[ADAPTER][:CLASS[:TOKEN]]",
        help="repeatable; CLASS defaults to NAME without trailing digits, TOKEN to 'sks', "
        "no ADAPTER = the base model",
    )
    p.add_argument(
        "--prompts", metavar="FILE", help="templates with '{}' (default: DreamBooth's 25)"
    )
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="DIR", help="write the images and results.json here")
    p.add_argument(
        "--generated", metavar="DIR", help="score DIR/NAME/prompt-NN/*.png instead of generating"
    )
    p.set_defaults(run=cmd_evaluate)
