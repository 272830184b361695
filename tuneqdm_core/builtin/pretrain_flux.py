"""Pretraining a built-in FLUX-family model (``tuneqdm pretrain --family flux``) on the same
captioned Fashion-MNIST scenes as ``models/fashion-sd``.

It writes a complete diffusers ``FluxPipeline`` folder (FLUX.1-dev's layout at toy size) with
``SHA256SUMS`` and a ``pretrain.json`` record in fashion-sd's shape. The choices:

- **VAE, CLIP and its tokenizer are reused**, frozen, from a fashion-sd folder (``init_vae``):
  that VAE is already trained on these scenes and maps 32 px to 16×16×4 latents, which FLUX
  packs 2×2 into 64 tokens of 16 channels (``FluxPipeline`` reads ``in_channels // 4`` = 4
  latent channels and a VAE factor of 2 from the VAE's two blocks). FLUX's VAE config carries a
  ``shift_factor`` as well as a ``scaling_factor`` (both measured, as FLUX.1's 0.1159/0.3611);
  the fashion-sd VAE's shift is ``null``, which ``FluxPipeline``'s decode cannot add, so both
  are measured here on 512 scenes (latent mean; 1/std about it) and written into the copied
  VAE config (weights unchanged): :meth:`FlowFamily.latents` and the pipeline then apply
  ``(z − shift)·scale`` and its inverse. Only CLIP's pooled output is used (FLUX's
  ``pooled_projections``); its trained weights give it meaning from the first step.
- **T5 is trained** together with the transformer (as fashion-sd trains its CLIP encoder with
  the UNet): a random frozen T5 would give the transformer's text stream noise to attend to.
  It is :func:`~tuneqdm_core.builtin.tiny_dit.t5_encoder` with
  :func:`~tuneqdm_core.builtin.tiny_dit.t5_tokenizer` over the scene words. Prompts are padded
  to 32 T5 tokens (captions take at most 14), saved as the tokenizer's ``model_max_length``,
  which :func:`tuneqdm_core.families.flux.sequence_length` reads: training at FLUX's 512 would
  spend 8/9 of the transformer on padding. Direct ``FluxPipeline`` calls should pass
  ``max_sequence_length=32`` (its default 512 runs, but pads beyond what training saw).
- **The objective is the library's FLUX fine-tuning's** (:mod:`tuneqdm_core.families.flow`,
  :mod:`~tuneqdm_core.families.flux`), through the same methods: latents shifted and scaled,
  σ from FLUX's density (uniform over the training scheduler's unshifted sigmas), noisy
  ``(1 − σ)·x + σ·n``, target ``n − x``, plain MSE, the guidance embedding at
  ``TRAIN_GUIDANCE`` (1.0). 10 % of captions are empty (the scene sampler's dropout, as for
  fashion-sd), so the model also predicts unconditionally: classifier-free guidance is
  ``FluxPipeline``'s ``true_cfg_scale`` with ``negative_prompt=""`` (what ``--samples`` draws
  with). The guidance *embedding* is not distilled: it only ever saw 1.0.
- **The loop** is fashion-sd's (:func:`~tuneqdm_core.builtin.pretrain.train_loop`): AdamW,
  linear warm-up, cosine decay to a tenth over the step budget or ``max_minutes``, gradient
  clipping at 1, the EMA of the trained weights saved.
- **Size**: a transformer of width 192 (6 heads of 32), 2 double-stream and 3 single-stream
  blocks: 4.65 M parameters (fashion-sd's UNet: 4.40 M), T5 0.06 M; the folder is about 22 MB
  in fp32 safetensors (≤ 25 MB). Native size 32 px. The scheduler is FLUX.1's with its dynamic
  shift rescaled to the toy size: 64 tokens (32 px, native) get FLUX.1's ``max_shift`` as 4096
  tokens (1024 px) do for FLUX.1, 16 tokens its ``base_shift``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from tuneqdm_core.base import BaseModel
from tuneqdm_core.builtin.pretrain import (
    FASHION_WORDS,
    RECORD,
    SAMPLE_SCENES,
    make_record,
    scene_grid,
    train_loop,
    write_checksums,
)
from tuneqdm_core.builtin.scenes import DATA_DIR, SIZE, SceneSampler, load_fashion, shrink
from tuneqdm_core.builtin.tiny_dit import t5_encoder, t5_tokenizer
from tuneqdm_core.families.flow import NATIVE_RESOLUTION_KEY
from tuneqdm_core.families.flux import FLUX, GUIDANCE_KEY, TRAIN_GUIDANCE
from tuneqdm_core.model import QuantConfig

TEXT_LENGTH = 32  # T5 tokens per prompt (module docstring)


@dataclass(frozen=True)
class FluxPretrainConfig:
    """The defaults take about 31 minutes on one CPU thread (0.94 s a step, measured:
    docs/builtin-model.md)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.999
    width: int = 192  # transformer width (heads of 32)
    double_layers: int = 2
    single_layers: int = 3
    t5_width: int = 64
    t5_layers: int = 2
    seed: int = 0
    # Stop (and save) after this many minutes, whatever ``steps`` says; 0 = no limit.
    max_minutes: float = 0.0


def build_transformer(config: FluxPretrainConfig, pooled_dim: int) -> FluxTransformer2DModel:
    heads = config.width // 32
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels × 2×2
        num_layers=config.double_layers,
        num_single_layers=config.single_layers,
        attention_head_dim=32,
        num_attention_heads=heads,
        joint_attention_dim=config.t5_width,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=(4, 14, 14),
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=16,
        max_image_seq_len=(SIZE // 4) ** 2,
    )


@torch.no_grad()
def _measure_latents(vae: AutoencoderKL, sampler: SceneSampler, device: torch.device) -> None:
    """Write the latents' mean and 1/std about it into the VAE config (module docstring)."""
    latents = torch.cat(
        [vae.encode(sampler.batch(64)[0].to(device)).latent_dist.mean for _ in range(8)]
    )
    shift = float(latents.mean())
    vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (latents - shift).std()))


def build_flux_pipeline(
    init_vae: str | Path, config: FluxPretrainConfig, sampler: SceneSampler, device: torch.device
) -> FluxPipeline:
    """A new pipeline: VAE, CLIP and tokenizer of the fashion-sd folder ``init_vae``, a new
    transformer and T5."""
    init_vae = Path(init_vae)
    vae = AutoencoderKL.from_pretrained(init_vae / "vae").to(device).eval().requires_grad_(False)
    _measure_latents(vae, sampler, device)
    clip = CLIPTextModel.from_pretrained(init_vae / "text_encoder").eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(init_vae / "tokenizer")
    torch.manual_seed(config.seed)
    tokenizer_2 = t5_tokenizer(FASHION_WORDS, max_length=TEXT_LENGTH)
    text_encoder_2 = t5_encoder(config.t5_width, len(tokenizer_2), config.t5_layers)
    transformer = build_transformer(config, clip.config.hidden_size)
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def mark_model(folder: Path) -> None:
    """Say in the folder's model_index.json what its configs cannot: that the model is guided
    classifier-free, not by its guidance embedding (``BaseModel.guidance``), and the side it was
    trained at (the service's native resolution; FLUX pipelines assume 1024 px)."""
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index[GUIDANCE_KEY] = "cfg"
    index[NATIVE_RESOLUTION_KEY] = SIZE
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def as_base(pipeline: FluxPipeline, device: torch.device, source: str = "") -> BaseModel:
    """The float pipeline as a :class:`BaseModel`, so that training runs through the FLUX
    family's own methods (encode, latents, noised, predict)."""
    return BaseModel(
        source=source,
        unet=pipeline.transformer,
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        scheduler_config=dict(pipeline.scheduler.config),
        quant=QuantConfig(),
        device=device,
        extra={"pipeline": pipeline},
        text_encoder_2=pipeline.text_encoder_2,
        tokenizer_2=pipeline.tokenizer_2,
        family=FLUX,
        guidance="cfg",
    )


def flux_loss(
    base: BaseModel, scheduler: Any, generator: torch.Generator
) -> Callable[[torch.Tensor, list[str]], torch.Tensor]:
    """The flow-matching loss of a batch of scenes (pixels in [-1, 1], captions)."""

    def loss(pixels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        with torch.no_grad():
            sample = base.vae.encode(pixels.to(base.device)).latent_dist.sample()
        latents = FLUX.latents(base, sample)
        sigmas = FLUX.draw_sigmas(len(captions), generator, scheduler)
        noisy, target = FLUX.noised(latents, torch.randn_like(latents), sigmas)
        conditioning = FLUX.encode(base, captions)  # CLIP frozen, T5 trains
        prediction = FLUX.predict(base, base.unet, noisy, sigmas, conditioning)
        return F.mse_loss(prediction, target)

    return loss


def pretrain_flux(
    out: str | Path,
    config: FluxPretrainConfig = FluxPretrainConfig(),
    *,
    device: str = "cpu",
    data_dir: Path = DATA_DIR,
    init: str | Path | None = None,
    init_vae: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and write the model to ``out`` (a ``FluxPipeline`` folder, ``SHA256SUMS``,
    ``pretrain.json``); returns the record. ``init_vae``: the fashion-sd folder whose VAE, CLIP
    and tokenizer a new model starts from; ``init``: a folder this function wrote, to train
    further (its record is kept in the new one)."""
    start = time.perf_counter()
    deadline = start + config.max_minutes * 60 if config.max_minutes > 0 else math.inf
    dev = torch.device(device)
    images, labels = load_fashion("train", data_dir)
    sampler = SceneSampler(shrink(images), labels, seed=config.seed)
    if init is not None:
        pipeline = FluxPipeline.from_pretrained(init)
        earlier = json.loads((Path(init) / RECORD).read_text())
        parts_from = Path(init)
    elif init_vae is not None:
        pipeline = build_flux_pipeline(init_vae, config, sampler, dev)
        earlier = None
        parts_from = Path(init_vae)
    else:
        raise ValueError("--family flux starts from a fashion-sd folder's VAE: give --init-vae")
    pipeline.to(dev)
    pipeline.vae.eval().requires_grad_(False)
    pipeline.text_encoder.eval().requires_grad_(False)
    vae_seconds = time.perf_counter() - start

    base = as_base(pipeline, dev, str(out))
    models = torch.nn.ModuleList([pipeline.transformer, pipeline.text_encoder_2]).train()
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(models.parameters(), lr=config.lr, weight_decay=1e-2)
    loss = flux_loss(
        base, FLUX.training_scheduler(base), torch.Generator().manual_seed(config.seed)
    )
    torch.manual_seed(config.seed)

    def loss_of_batch() -> torch.Tensor:
        return loss(*sampler.batch(config.batch_size))

    step, losses = train_loop(models, ema, optimizer, config, loss_of_batch, start, deadline, log)
    models.load_state_dict(ema.state_dict())
    pipeline.to("cpu")
    out = Path(out)
    pipeline.save_pretrained(out)
    mark_model(out)
    # The plain vocab/merges beside tokenizer.json, as fashion-sd's CLIP tokenizer has them.
    for name in ("vocab.json", "merges.txt"):
        source = parts_from / "tokenizer" / name
        if source.is_file():
            shutil.copyfile(source, out / "tokenizer" / name)
    record = make_record(
        earlier,
        config,
        step,
        dev,
        start,
        vae_seconds,
        [],
        losses,
        {
            "transformer": pipeline.transformer,
            "vae": pipeline.vae,
            "text": pipeline.text_encoder,
            "text_2": pipeline.text_encoder_2,
        },
    )
    record = {"family": "flux", "vae_from": str(init_vae) if init is None else None, **record}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    write_checksums(out)
    return record


@torch.no_grad()
def sample_grid_flux(
    model_dir: str | Path, *, steps: int = 30, guidance: float = 4.0, device: str = "cpu"
) -> Any:
    """fashion-sd's sample grid drawn by ``FluxPipeline``: classifier-free guidance against the
    empty caption (``true_cfg_scale``), the guidance embedding at the value it was trained at."""
    pipeline = FluxPipeline.from_pretrained(model_dir, local_files_only=True).to(device)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [scene.caption() for scene in SAMPLE_SCENES]
    images = pipeline(
        prompts,
        negative_prompt=[""] * len(prompts),
        true_cfg_scale=guidance,
        guidance_scale=TRAIN_GUIDANCE,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        max_sequence_length=pipeline.tokenizer_2.model_max_length,
        generator=torch.Generator().manual_seed(0),
    ).images
    return scene_grid(images)
