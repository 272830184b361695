"""Does fine-tuning learn the subject? The paper's comparison on the built-in model.

    PYTHONPATH=. python benchmarks/quality.py [--subjects 2] [--seeds 0 1 2] [--steps 150]
        [--variants full peqa-w8 ...] [--photo-sets distinct varied] [--class-images 0]
        [--export-ranks 4 32] [--against VARIANT] [--json PATH] | --report JSON...

Subjects are Fashion-MNIST test-set garments (never seen in pretraining), the most atypical of
their class, each shown in 5 photos (other backgrounds and positions) and given its own token
("a photo of sks bag"). Every variant fine-tunes the same subjects with the same seeds (with
``--class-images N``, also prior preservation on "a photo of a bag" images from the base), then
draws the subject in new contexts ("a photo of sks bag on a red background, top right").
Columns: subject fidelity (EfficientNet-Lite0 feature cosine to the subject's photos, garment
only; the analogue of DINO/CLIP-I), prompt fidelity (background colour right, position right;
the analogue of CLIP-T); mean ± standard deviation over seeds. Reference rows: the photos
against each other, and the base model drawing the class without the token. With
``--export-ranks``, each adapter is also exported as a LoRA of those ranks
(``tuneqdm_core.export``) and drawn by diffusers' own pipeline of the float model with
``load_lora_weights``: rows ``<variant> LoRA r<k> on float``.

Transformer bases (``--model models/fashion-flux``, the built-in FLUX-family model) run the same
subjects, prompts and scores; their baselines are ``lora-r16-w4`` (LoRA of rank 16 on every
linear layer of the same W4 base, ``tuneqdm_core.lora``) and ``full`` (the float transformer),
drawn by the family's own diffusers pipeline with the base's guidance (classifier-free for
fashion-flux). The column "adapter KiB" is what a run stores per subject in float32 values:
the scale vectors, the LoRA pairs, or the whole fine-tuned denoiser.

Photo sets (``--photo-sets``): ``distinct`` puts the photos on backgrounds and at positions
the prompts never ask for; ``varied`` on the very colours the prompts ask for (red, blue,
yellow, green), each at another place — a user's photos of a bag on four coloured backgrounds,
where an adapter that learned the backgrounds draws the wrong one. With more than one set, rows
are ``<variant> [<set>]``. ``--against VARIANT`` adds a table of paired differences to that
variant (same subjects, photos, seeds and sampling noise): mean ± standard error over the
(seed, subject) pairs, and each row's prompt fidelity as a share of the base's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from benchmarks import common
from benchmarks.fidelity import FeatureNet, prompt_fidelity, self_similarity, subject_fidelity
from benchmarks.subjects import (
    DEFAULT_MODEL,
    NEW_CONTEXTS,
    PHOTO_SETS,
    SUBJECT_CLASSES,
    SubjectItem,
    pick_subjects,
)
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.builtin.scenes import DATA_DIR, SIZE
from tuneqdm_core.cli.reports import table
from tuneqdm_core.export import export_lora, load_float_unet
from tuneqdm_core.finetune import (
    S_OUT_RELATIVE_LR,
    FinetuneConfig,
    FinetuneResult,
    Subject,
    finetune,
)
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.images import to_pil, to_training_tensor
from tuneqdm_core.lora import LoRA
from tuneqdm_core.model import QuantConfig, quant_state


@dataclass(frozen=True)
class Variant:
    method: str  # tuneqdm | peqa | lora | full
    bits: Literal[4, 8]  # of the base it is trained on (full trains the float denoiser)
    intervals: int = 1
    lr: float | None = None  # full only: instead of --lr-full
    steps: int | None = None  # instead of --steps
    # lr_s_out as a multiple of the base's median s0, instead of --lr-s-out
    relative_lr: float | None = None
    lr_s_in: float | None = None  # instead of --lr-s-in


VARIANTS = {
    "full": Variant("full", 8),
    # Ten times DreamBooth's rate: more of the subject, less of the prompt.
    "full-lr5e-5": Variant("full", 8, lr=5e-5),
    "peqa-w8": Variant("peqa", 8),
    "peqa-w4": Variant("peqa", 4),
    # QLoRA's arrangement: rank 16 on the same W4 base (diffusers' FLUX LoRA rank and rate).
    "lora-r16-w4": Variant("lora", 4),
    # s_in's rate, the one TuneQDM has and PEQA lacks, above the core's 1e-3.
    **{
        f"tuneqdm-w4-sin{n}": Variant("tuneqdm", 4, lr_s_in=v)
        for n, v in (("3e-3", 3e-3), ("1e-2", 1e-2))
    },
    **{f"tuneqdm-w{bits}-i{k}": Variant("tuneqdm", bits, k) for bits in (8, 4) for k in (1, 2, 4)},
    # Candidate default recipes of the service (W4, one interval; docs/benchmarks.md).
    **{
        f"recipe-{steps}-rel{name}": Variant("tuneqdm", 4, steps=steps, relative_lr=rel)
        for steps in (400, 300, 200, 150)
        for name, rel in (("2e-3", 2e-3), ("1e-3", 1e-3))
    },
}


def _float_pipeline(base: BaseModel, unet: Any) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(base.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _requests(
    prompts: Sequence[str], args: argparse.Namespace, adapter: Any = None
) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            prompt=p,
            adapter=adapter,
            num_images=args.images,
            steps=args.sample_steps,
            guidance_scale=args.guidance,
            width=SIZE,
            height=SIZE,
        )
        for p in prompts
    ]


def _draw_float_flow(
    base: BaseModel, model: Any, prompts: Sequence[str], args: argparse.Namespace
) -> list[torch.Tensor]:
    """A float transformer drawn as the core draws the quantized one: the family's pipeline,
    scheduler, prompt embeddings and guidance arguments, the same seeds."""
    family = base.family
    pipeline = family.pipeline_class()(
        **{
            **base.extra["pipeline"].components,
            "transformer": model,
            "scheduler": family.scheduler(base, "euler"),
        }
    )
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for request in _requests(prompts, args):
        rows = [request] * request.num_images
        out = pipeline(
            **family.pipeline_call(base, [request], rows),
            **family.guidance_call(base, request.guidance_scale),
            num_inference_steps=request.steps,
            height=SIZE,
            width=SIZE,
            generator=[torch.Generator().manual_seed(s) for s in range(request.num_images)],
            output_type="pt",
        ).images
        images += [x * 2 - 1 for x in out]
    return images


def draw(
    base: BaseModel,
    prompts: Sequence[str],
    args: argparse.Namespace,
    *,
    adapter: Any = None,
    float_unet: Any = None,
    lora: LoRA | None = None,
) -> list[torch.Tensor]:
    """``args.images`` images per prompt, as ``[3, H, W]`` in [-1, 1]; with the float
    ``float_unet`` (full fine-tuning) through diffusers' own pipeline, same sampler; with
    ``lora``, the quantized base with its low-rank updates."""
    if float_unet is not None and base.family.denoiser == "transformer":
        return _draw_float_flow(base, float_unet, prompts, args)
    if float_unet is not None:
        pipeline = _float_pipeline(base, float_unet)
        images = []
        for prompt in prompts:
            out = pipeline(
                [prompt] * args.images,
                height=SIZE,
                width=SIZE,
                num_inference_steps=args.sample_steps,
                guidance_scale=args.guidance,
                generator=[torch.Generator().manual_seed(s) for s in range(args.images)],
                output_type="pt",
            ).images
            images += [x * 2 - 1 for x in out]
        return images
    with lora.applied(base.unet) if lora is not None else nullcontext():
        results = generate(base, _requests(prompts, args, adapter))
    return [to_training_tensor(g.image, SIZE) for result in results for g in result]


def score(
    net: FeatureNet, images: list[torch.Tensor], subject: SubjectItem, args: argparse.Namespace
) -> dict[str, float]:
    contexts = NEW_CONTEXTS[: args.contexts]
    colours = [c for c, _ in contexts for _ in range(args.images)]
    positions = [p for _, p in contexts for _ in range(args.images)]
    background, position = prompt_fidelity(images, colours, positions)
    return {
        "subject": statistics.fmean(subject_fidelity(net, images, subject.photos)),
        "background": statistics.fmean(background),
        "position": statistics.fmean(position),
    }


def run_variant(
    name: str,
    subject: SubjectItem,
    seed: int,
    bases: dict[Literal[4, 8], BaseModel],
    net: FeatureNet,
    args: argparse.Namespace,
    cache: Path,
) -> dict[str, dict[str, float]]:
    """Scores of the fine-tuned variant (and of its LoRA exports), by row name."""
    variant = VARIANTS[name]
    base = bases[variant.bits]
    lr_s_out = args.lr_s_out
    relative_lr = variant.relative_lr or args.s_out_relative_lr
    if relative_lr is not None:
        lr_s_out = relative_lr * float(quant_state(base.unet).base_scales().abs().median())
    config = FinetuneConfig(
        method=variant.method,  # type: ignore[arg-type]
        intervals=variant.intervals,
        steps=variant.steps or args.steps,
        lr_s_out=lr_s_out,
        lr_s_in=variant.lr_s_in or args.lr_s_in,
        lr=variant.lr or args.lr_full,
        lr_lora=args.lr_lora,
        resolution=SIZE,
        seed=seed,
        num_class_images=args.class_images,
        class_image_steps=args.sample_steps,
    )
    photos = to_pil(torch.stack(subject.photos))
    class_prompt = f"a photo of a {subject.name}" if args.class_images else None
    start = time.perf_counter()
    result = finetune(
        base, [Subject(subject.instance_prompt, photos, class_prompt)], config, cache_dir=cache
    )
    seconds = time.perf_counter() - start
    prompts = [subject.prompt(c, p) for c, p in NEW_CONTEXTS[: args.contexts]]
    images = draw(
        base, prompts, args, adapter=result.adapter, float_unet=result.unet, lora=result.lora
    )
    rows = {
        name: {
            **score(net, images, subject, args),
            "seconds": seconds,
            "kib": stored_kib(result),
        }
    }
    adapter = result.adapter
    for rank in args.export_ranks:
        if adapter is None:  # full fine-tuning: a float UNet, nothing to export
            break
        # The adapter as a LoRA on the float model, drawn by diffusers' pipeline.
        start = time.perf_counter()
        float_unet = load_float_unet(args.model)
        lora = export_lora(base.unet, float_unet, adapter, rank=rank)
        pipeline = _float_pipeline(base, float_unet)
        pipeline.load_lora_weights(lora.tensors)
        images = draw(base, prompts, args, float_unet=pipeline.unet)
        rows[f"{name} LoRA r{rank} on float"] = {
            **score(net, images, subject, args),
            "seconds": time.perf_counter() - start,
            "relative_error": lora.error,
        }
    return rows


def stored_kib(result: FinetuneResult) -> float:
    """What the run stores per subject, in KiB of float32 values."""
    if result.adapter is not None:
        values = result.adapter.num_values()
    elif result.lora is not None:
        return result.lora.num_bytes() / 1024
    else:
        assert result.unet is not None  # method full
        values = sum(p.numel() for p in result.unet.parameters())
    return 4 * values / 1024


def reference_rows(
    subjects: Sequence[SubjectItem],
    bases: dict[Literal[4, 8], BaseModel],
    net: FeatureNet,
    args: argparse.Namespace,
) -> dict[str, dict[str, float]]:
    """The photos themselves, and each base drawing the class in the new contexts."""
    rows = {
        "subject photos": {
            "subject": statistics.fmean(self_similarity(net, s.photos) for s in subjects)
        }
    }
    for bits, base in sorted(bases.items(), reverse=True):
        scores = []
        for subject in subjects:
            prompts = [
                subject.prompt(c, p, with_token=False) for c, p in NEW_CONTEXTS[: args.contexts]
            ]
            scores.append(score(net, draw(base, prompts, args), subject, args))
        rows[f"base W{bits}, class prompt"] = {
            k: statistics.fmean(s[k] for s in scores) for k in scores[0]
        }
    return rows


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {spread:.3f}"


def summarise(
    results: dict[str, dict[int, list[dict[str, float]]]],
    references: dict[str, dict[str, float]],
) -> str:
    """One row per variant: per seed, the mean over subjects; then mean ± std over seeds."""
    header = [
        "variant",
        "subject fidelity",
        "prompt fidelity",
        "background",
        "position",
        "adapter KiB",
        "s/run",
    ]
    rows: list[list[object]] = []
    for name, reference in references.items():
        # The photos have no prompt: only a subject score.
        scores = dict(reference)
        if "background" in scores:
            scores["prompt"] = (scores["background"] + scores["position"]) / 2
        cells = [scores.get(k) for k in ("subject", "prompt", "background", "position")]
        rows.append([name, *("-" if v is None else f"{v:.3f}" for v in cells), "-", "-"])
    for name, by_seed in results.items():
        per_seed = {
            key: [statistics.fmean(r[key] for r in runs) for runs in by_seed.values()]
            for key in ("subject", "background", "position", "seconds")
        }
        prompt_scores = [
            (b + p) / 2 for b, p in zip(per_seed["background"], per_seed["position"], strict=True)
        ]
        rows.append(
            [
                name,
                _cell(per_seed["subject"]),
                _cell(prompt_scores),
                _cell(per_seed["background"]),
                _cell(per_seed["position"]),
                _kib(by_seed),
                f"{statistics.fmean(per_seed['seconds']):.1f}",
            ]
        )
    return table(header, rows)


def _kib(by_seed: dict[int, list[dict[str, float]]]) -> str:
    """The stored size of a row's runs (older result files have none)."""
    sizes = [r["kib"] for runs in by_seed.values() for r in runs if "kib" in r]
    return f"{statistics.fmean(sizes):,.1f}" if sizes else "-"


def _photo_set(row: str) -> str:
    """The " [set]" suffix of a row name, or "" for a run with one photo set."""
    return row[row.rindex(" [") :] if row.endswith("]") else ""


def _mean_se(values: Sequence[float]) -> str:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return f"{mean:+.3f} ± {se:.3f}"


def paired(
    results: dict[str, dict[int, list[dict[str, float]]]],
    references: dict[str, dict[str, float]],
    against: str,
) -> str:
    """Each row's differences to ``against`` (the row of the same photo set), pair by pair:
    one pair per (seed, subject), since both saw the same photos, seeds and noise. Mean ±
    standard error; and the row's prompt fidelity as a share of its base's."""
    header = ["variant", "Δ subject", "÷ SE", "Δ prompt", "Δ background", "prompt ÷ base", "pairs"]
    rows: list[list[object]] = []
    for name, by_seed in results.items():
        reference = results.get(against + _photo_set(name))
        if reference is None or name == against + _photo_set(name):
            continue
        bits = VARIANTS[name.split(" ")[0]].bits if name.split(" ")[0] in VARIANTS else 4
        # The base of the row's bits; where a run drew only the other one, that one (full
        # fine-tuning trains the float model: both are references for it).
        bases = [v for k, v in sorted(references.items()) if k.startswith("base W")]
        base = references.get(f"base W{bits}, class prompt", bases[0] if bases else None)
        deltas: dict[str, list[float]] = {"subject": [], "prompt": [], "background": []}
        prompts = []
        for seed, runs in by_seed.items():
            for run, ref in zip(runs, reference.get(seed, []), strict=False):
                prompt = (run["background"] + run["position"]) / 2
                deltas["subject"].append(run["subject"] - ref["subject"])
                deltas["prompt"].append(prompt - (ref["background"] + ref["position"]) / 2)
                deltas["background"].append(run["background"] - ref["background"])
                prompts.append(prompt)
        if not prompts:
            continue
        share = "-"
        base_prompt = 0.0 if base is None else (base["background"] + base["position"]) / 2
        if base_prompt > 0:  # a base that drew no prompt right has no share to give
            share = f"{statistics.fmean(prompts) / base_prompt:.3f}"
        subject = deltas["subject"]
        spread = statistics.stdev(subject) if len(subject) > 1 else 0.0
        # The subject difference in standard errors (how far from chance a lead is).
        z = f"{statistics.fmean(subject) / (spread / len(subject) ** 0.5):+.1f}" if spread else "-"
        cells = [_mean_se(d) for d in deltas.values()]
        rows.append([name, cells[0], z, *cells[1:], share, str(len(prompts))])
    return f"paired against {against}:\n" + table(header, rows)


def report(paths: Sequence[str], against: str | None = None) -> str:
    """The table of several runs' JSON files: references from the first that has them."""
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    references: dict[str, dict[str, float]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        references = references or data["references"]
        for name, by_seed in data["results"].items():
            # A variant in several files (other seeds) gathers all of its seeds.
            results.setdefault(name, {}).update({int(s): runs for s, runs in by_seed.items()})
    # Variants in their order, each followed by its photo sets and export rows.
    order = [r for n in VARIANTS for r in results if r == n or r.startswith(f"{n} ")]
    ordered = {n: results[n] for n in order}
    text = summarise(ordered, references)
    if against:
        text += "\n\n" + paired(ordered, references, against)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--subjects", type=int, default=2, help=f"at most {len(SUBJECT_CLASSES)}")
    parser.add_argument("--photo-sets", nargs="+", default=["distinct"], choices=list(PHOTO_SETS))
    parser.add_argument(
        "--against", metavar="VARIANT", choices=list(VARIANTS), help="add paired differences"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument(
        "--lr-s-out", type=float, help="absolute; default: relative to the base's s0 (the core's)"
    )
    parser.add_argument(
        "--s-out-relative-lr",
        type=float,
        help=f"lr_s_out as a multiple of the base's median s0 (the core's: {S_OUT_RELATIVE_LR})",
    )
    parser.add_argument("--lr-s-in", type=float, default=FinetuneConfig.lr_s_in)
    parser.add_argument("--lr-full", type=float, default=FinetuneConfig.lr)
    parser.add_argument("--lr-lora", type=float, default=FinetuneConfig.lr_lora)
    parser.add_argument("--class-images", type=int, default=0, help="prior preservation; 0: off")
    parser.add_argument("--contexts", type=int, default=len(NEW_CONTEXTS))
    parser.add_argument("--images", type=int, default=2, help="images per new-context prompt")
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--no-reference", action="store_true", help="skip the reference rows")
    parser.add_argument(
        "--export-ranks",
        type=int,
        nargs="*",
        default=[],
        help="also score each adapter exported as a LoRA of these ranks on the float model",
    )
    parser.add_argument("--json", metavar="PATH", help="write all numbers here")
    parser.add_argument(
        "--report",
        nargs="+",
        metavar="JSON",
        help="print one table from earlier runs' JSON (e.g. variants split over processes)",
    )
    args = parser.parse_args(argv)
    if args.report:
        print(report(args.report, args.against))
        return 0
    if not 1 <= args.subjects <= len(SUBJECT_CLASSES):
        parser.error(f"--subjects must be 1..{len(SUBJECT_CLASSES)}")
    if not 1 <= args.contexts <= len(NEW_CONTEXTS):
        parser.error(f"--contexts must be 1..{len(NEW_CONTEXTS)}")

    start = time.perf_counter()
    print(f"machine: {common.machine()}; model {args.model}", flush=True)
    subjects = [
        subject
        for photo_set in args.photo_sets
        for subject in pick_subjects(args.subjects, Path(args.data_dir), photo_set)
    ]
    named_sets = len(args.photo_sets) > 1
    net = FeatureNet()
    results: dict[str, dict[int, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        bits_needed: set[Literal[4, 8]] = {VARIANTS[v].bits for v in args.variants}
        bases = {
            bits: load_base(args.model, quant=QuantConfig(bits=bits), cache_dir=Path(tmp) / "q")
            for bits in sorted(bits_needed)
        }
        if args.export_ranks and any(b.family.denoiser != "unet" for b in bases.values()):
            parser.error("--export-ranks draws exports with the SD pipeline: UNet bases only")
        # The base drawing the class does not depend on the photos: one photo set's subjects.
        references = (
            {} if args.no_reference else reference_rows(subjects[: args.subjects], bases, net, args)
        )
        for name in args.variants:
            for seed in args.seeds:
                by_row: dict[str, list[dict[str, float]]] = {}
                for subject in subjects:
                    rows = run_variant(name, subject, seed, bases, net, args, Path(tmp) / "class")
                    for row, scores in rows.items():
                        if named_sets:
                            row = f"{row} [{subject.photo_set}]"
                        by_row.setdefault(row, []).append(scores)
                for row, runs in by_row.items():
                    results.setdefault(row, {})[seed] = runs
                    fidelity = statistics.fmean(r["subject"] for r in runs)
                    elapsed = time.perf_counter() - start
                    print(
                        f"{row} seed {seed}: subject {fidelity:.3f} ({elapsed:.0f} s)", flush=True
                    )
    print(summarise(results, references))
    if args.against:
        print(paired(results, references, args.against))
    print(f"total {time.perf_counter() - start:.0f} s")
    common.write_json(
        args.json,
        {
            "benchmark": "quality",
            "machine": common.machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "subjects": [s.name for s in subjects[: args.subjects]],
            "references": references,
            "results": {n: {str(s): r for s, r in by.items()} for n, by in results.items()},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
