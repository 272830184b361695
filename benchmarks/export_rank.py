"""How close is a LoRA export to the adapter it came from, by rank?

    PYTHONPATH=. python benchmarks/export_rank.py [--steps 100] [--ranks 1 4 16 64 0]
        [--intervals 1] [--json PATH]

Fine-tunes a TuneQDM adapter (W4) on one Fashion-MNIST subject of the built-in model, then
exports it as a LoRA of each rank (0 = full rank), with and without the quantization error in
``D`` (docs/library.md, "Exports"), loads it with diffusers' ``load_lora_weights`` into a
pipeline of the float model and compares with the adapter on the quantized base: the file's
weight error ``‖D − B·A‖ / ‖D‖``, the UNet output's relative error (latents and prompts of the
subject, timesteps spread over all intervals), and the images' mean absolute pixel difference
(0–255, same seeds and sampler). The merged UNet is the last row.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from benchmarks import common
from benchmarks.subjects import DEFAULT_MODEL, NEW_CONTEXTS, pick_subjects
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.builtin.scenes import DATA_DIR, SIZE
from tuneqdm_core.cli.reports import table
from tuneqdm_core.export import export_lora, load_float_unet, merge_adapter
from tuneqdm_core.finetune import FinetuneConfig, Subject, finetune
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.images import to_pil
from tuneqdm_core.model import QuantConfig
from tuneqdm_core.routing import set_route, use_adapter


def _pipeline(base: BaseModel, unet: Any) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(base.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _unet_outputs(
    base: BaseModel, unet: Any, prompts: list[str], adapter: Any = None
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    n = len(prompts)
    shape = (n, base.latent_channels, SIZE // base.vae_scale_factor, SIZE // base.vae_scale_factor)
    outputs = []
    for t in (50, 250, 450, 650, 850):  # both halves of a 2-interval adapter
        x = torch.randn(shape, generator=generator)
        timesteps = torch.full((n,), t)
        if adapter is not None:
            use_adapter(unet, adapter, timesteps)
        try:
            outputs.append(
                unet(x, timesteps, encoder_hidden_states=base.encode_prompts(prompts)).sample
            )
        finally:
            if adapter is not None:
                set_route(unet, None)
    return torch.cat(outputs)


def _images(pipe: StableDiffusionPipeline, prompts: list[str], steps: int) -> np.ndarray:
    images = []
    for prompt in prompts:
        out = pipe(
            prompt,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        images.append(np.asarray(out, dtype=np.float32))
    return np.stack(images)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--intervals", type=int, default=1, help="of the adapter (service: 1)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16, 64, 0])
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print(f"machine: {common.machine()}; model {args.model}", flush=True)
    base = load_base(args.model, quant=QuantConfig(bits=4))
    subject = pick_subjects(1, Path(args.data_dir))[0]
    config = FinetuneConfig(
        method="tuneqdm", intervals=args.intervals, steps=args.steps, resolution=SIZE, seed=0
    )
    photos = to_pil(torch.stack(subject.photos))
    adapter = finetune(base, [Subject(subject.instance_prompt, photos, None)], config).adapter
    assert adapter is not None
    print(f"fine-tuned {args.steps} steps ({time.perf_counter() - start:.0f} s)", flush=True)

    prompts = [subject.prompt(c, p) for c, p in NEW_CONTEXTS[:3]]
    want_out = _unet_outputs(base, base.unet, prompts, adapter)
    requests = [
        GenerationRequest(
            p, adapter, steps=args.sample_steps, guidance_scale=4.0, width=SIZE, height=SIZE
        )
        for p in prompts
    ]
    want_images = np.stack(
        [np.asarray(g[0].image, dtype=np.float32) for g in generate(base, requests)]
    )
    float_unet = load_float_unet(args.model)
    full_rank = max(
        min(layer.out_channels, int(torch.Size(layer.weight_shape[1:]).numel()))
        for _, layer in base.unet.tuneqdm_state.layers
    )

    def measure(unet: Any) -> tuple[float, float]:
        out = _unet_outputs(base, unet, prompts)
        output_error = float((out - want_out).norm() / want_out.norm())
        pixels = float(
            np.abs(_images(_pipeline(base, unet), prompts, args.sample_steps) - want_images).mean()
        )
        return output_error, pixels

    rows: list[list[object]] = []
    numbers: list[dict[str, Any]] = []
    plain = measure(float_unet)
    rows.append(["float base, no export", "-", "-", f"{plain[0]:.4f}", f"{plain[1]:.2f}"])
    for with_error in (True, False):
        for rank in args.ranks:
            r = rank or full_rank
            lora = export_lora(
                base.unet, float_unet, adapter, rank=r, include_quantization_error=with_error
            )
            pipe = _pipeline(base, copy.deepcopy(float_unet))
            pipe.load_lora_weights(lora.tensors)
            output_error, pixels = measure(pipe.unet)
            label = f"LoRA r{r}{' (full)' if not rank else ''}"
            mode = "Ŵ − W" if with_error else "Ŵ − dequant(q)"
            rows.append([label, mode, f"{lora.error:.4f}", f"{output_error:.4f}", f"{pixels:.2f}"])
            numbers.append(
                {
                    "rank": r,
                    "with_quantization_error": with_error,
                    "weight_error": lora.error,
                    "output_error": output_error,
                    "pixel_difference": pixels,
                }
            )
            print(rows[-1], flush=True)
    merged = {}
    for interval in ["mean", *range(args.intervals)]:
        unet = merge_adapter(base.unet, copy.deepcopy(float_unet), adapter, interval=interval)
        merged[str(interval)] = measure(unet)
        output_error, pixels = merged[str(interval)]
        rows.append(
            [f"merged UNet, interval {interval}", "-", "0", f"{output_error:.4f}", f"{pixels:.2f}"]
        )
    header = [
        "export (LoRA: interval mean)",
        "D",
        "weight error",
        "UNet output error",
        "pixel diff",
    ]
    print(table(header, rows))
    seconds = time.perf_counter() - start
    print(f"adapter: {args.intervals} interval(s), {args.steps} steps; total {seconds:.0f} s")
    common.write_json(
        args.json,
        {
            "benchmark": "export_rank",
            "machine": common.machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "plain": plain,
            "merged": merged,
            "results": numbers,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
