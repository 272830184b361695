"""Pretraining the built-in text-to-image model on captioned Fashion-MNIST scenes.

The same classes as Stable Diffusion (AutoencoderKL, UNet2DConditionModel, CLIPTextModel with
the project's CLIP BPE tokenizer) at a size a CPU trains in about an hour: first the VAE
(reconstruction + a small KL term, as in latent diffusion), then the UNet and the text encoder
together on the ε-prediction loss with SD's noise schedule, keeping an exponential moving
average of their weights (what is saved). Scenes are drawn from the 60k training images only;
the 10k test images stay unseen for the personalization benchmark.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image

from tuneqdm_core.builtin.scenes import (
    CLASSES,
    DATA_DIR,
    SIZE,
    Scene,
    SceneSampler,
    load_fashion,
    shrink,
)
from tuneqdm_core.builtin.tiny import WORDS, build_pipeline, save_pipeline
from tuneqdm_core.configs import UNET_CONFIGS

FASHION_WORDS = (*WORDS, "tshirt")
CHECKSUMS = "SHA256SUMS"
RECORD = "pretrain.json"


@dataclass(frozen=True)
class PretrainConfig:
    """Defaults fit about an hour on 2 CPU cores (≈ 57 min measured: docs/builtin-model.md)."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    vae_steps: int = 500
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    ema_decay: float = 0.999
    text_layers: int = 3
    seed: int = 0
    # Stop (and save) after this many minutes, whatever ``steps`` says; 0 = no limit.
    max_minutes: float = 0.0


class Schedule(Protocol):
    """What the shared training loop reads of a config (PretrainConfig, FluxPretrainConfig)."""

    @property
    def steps(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def warmup(self) -> int: ...
    @property
    def ema_decay(self) -> float: ...


def _lr_factor(step: int, progress: float, config: Schedule) -> float:
    """Linear warm-up, then cosine decay to a tenth over ``progress`` (0 → 1)."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _tokens(tokenizer: Any, caption: str, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token ids padded to 77, memoised: there are only a few hundred distinct captions."""
    if caption not in cache:
        cache[caption] = tokenizer(
            caption, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids[0]
    return cache[caption]


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters(), strict=True):
        e.lerp_(p, 1 - decay)


def train_loop(
    models: torch.nn.Module,
    ema: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Schedule,
    loss_of_batch: Callable[[], torch.Tensor],
    start: float,
    deadline: float,
    log: Callable[[str], None],
) -> tuple[int, list[float]]:
    """The steps every built-in model trains with: ``loss_of_batch()`` (a fresh batch's loss)
    under AdamW's learning rate with warm-up and cosine decay over the step budget or the time
    limit (``deadline``, ``perf_counter`` seconds), whichever ends first, gradients clipped at
    1, the moving average ``ema`` of ``models`` updated after each step. Returns (steps done,
    losses)."""
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # read back in groups: a sync per step slows a GPU
    step, phase_start = 0, time.perf_counter()
    while step < config.steps and time.perf_counter() < deadline:
        # The schedule ends at whichever comes first, the last step or the time limit.
        progress = step / config.steps
        if deadline < math.inf:
            progress = max(progress, (time.perf_counter() - phase_start) / (deadline - phase_start))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_factor(step, progress, config)
        loss = loss_of_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        # Warm the average up so that short runs are not dominated by the random init.
        _ema_update(ema, models, min(config.ema_decay, (1 + step) / (10 + step)))
        pending.append(loss.detach())
        step += 1
        if step % 100 == 0 or step == config.steps:
            losses += torch.stack(pending).tolist()
            pending.clear()
            recent = sum(losses[-100:]) / len(losses[-100:])
            elapsed = time.perf_counter() - start
            log(f"step {step}/{config.steps} loss {recent:.4f} ({elapsed:.0f} s)")
    losses += torch.stack(pending).tolist() if pending else []
    return step, losses


def _train_vae(
    pipeline: StableDiffusionPipeline,
    sampler: SceneSampler,
    config: PretrainConfig,
    device: torch.device,
    log: Callable[[str], None],
) -> list[float]:
    vae = pipeline.vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    losses: list[float] = []
    for step in range(config.vae_steps):
        pixels = sampler.batch(config.batch_size)[0].to(device)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, pixels) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step + 1}/{config.vae_steps} loss {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    # Latent diffusion scales latents to unit variance (SD's 0.18215 was measured the same way).
    latents = torch.cat(
        [vae.encode(sampler.batch(64)[0].to(device)).latent_dist.mean for _ in range(8)]
    )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return losses


def pretrain(
    out: str | Path,
    config: PretrainConfig = PretrainConfig(),
    *,
    device: str = "cpu",
    data_dir: Path = DATA_DIR,
    init: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the model and write it to ``out`` as a diffusers folder with a checksum file and
    a record of how it was made; returns that record. ``init``: a model folder this function
    wrote before, to train further (its record is kept in the new one)."""
    start = time.perf_counter()
    deadline = start + config.max_minutes * 60 if config.max_minutes > 0 else math.inf
    dev = torch.device(device)
    images, labels = load_fashion("train", data_dir)
    sampler = SceneSampler(shrink(images), labels, seed=config.seed)
    if init is None:
        pipeline = build_pipeline(
            UNET_CONFIGS["fashion-sd"],
            seed=config.seed,
            resolution=SIZE,
            words=FASHION_WORDS,
            text_layers=config.text_layers,
        )
        earlier = None
    else:
        pipeline = _load_pipeline(init)
        earlier = json.loads((Path(init) / RECORD).read_text())
    torch.manual_seed(config.seed)
    vae_losses = _train_vae(pipeline, sampler, config, dev, log) if init is None else []
    pipeline.vae.to(dev).eval().requires_grad_(False)
    vae_seconds = time.perf_counter() - start

    unet, text_encoder, tokenizer = pipeline.unet, pipeline.text_encoder, pipeline.tokenizer
    models = torch.nn.ModuleList([unet, text_encoder]).to(dev).train()
    ema = copy.deepcopy(models).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(models.parameters(), lr=config.lr, weight_decay=1e-2)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    scaling = pipeline.vae.config.scaling_factor
    token_cache: dict[str, torch.Tensor] = {}

    def loss_of_batch() -> torch.Tensor:
        pixels, captions = sampler.batch(config.batch_size)
        with torch.no_grad():
            latents = pipeline.vae.encode(pixels.to(dev)).latent_dist.sample() * scaling
        tokens = torch.stack([_tokens(tokenizer, c, token_cache) for c in captions]).to(dev)
        noise = torch.randn_like(latents)
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (len(captions),), device=dev
        )
        noisy = noise_scheduler.add_noise(latents, noise, t)
        prediction = unet(noisy, t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        return F.mse_loss(prediction, noise)

    step, losses = train_loop(models, ema, optimizer, config, loss_of_batch, start, deadline, log)
    models.load_state_dict(ema.state_dict())
    pipeline.to("cpu")
    out = Path(out)
    save_pipeline(pipeline, out, FASHION_WORDS)
    record = make_record(
        earlier,
        config,
        step,
        dev,
        start,
        vae_seconds,
        vae_losses,
        losses,
        {"unet": unet, "vae": pipeline.vae, "text": text_encoder},
    )
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    write_checksums(out)
    return record


def make_record(
    earlier: dict[str, Any] | None,
    config: Any,
    steps_done: int,
    dev: torch.device,
    start: float,
    vae_seconds: float,
    vae_losses: list[float],
    losses: list[float],
    parts: dict[str, torch.nn.Module],
) -> dict[str, Any]:
    """The ``pretrain.json`` record of a run: what it continued, its config, where it ran,
    how long, its first and last losses and the parameter count of each part."""
    return {
        "continues": earlier,
        "config": asdict(config),
        "steps_done": steps_done,
        "device": (
            torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
        ),
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
        "vae_seconds": round(vae_seconds, 1),
        "vae_loss_last100": sum(vae_losses[-100:]) / max(1, len(vae_losses[-100:])),
        "loss_first100": sum(losses[:100]) / max(1, len(losses[:100])),
        "loss_last100": sum(losses[-100:]) / max(1, len(losses[-100:])),
        "parameters": {
            name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()
        },
    }


def _load_pipeline(model_dir: str | Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _digests(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name != CHECKSUMS
    }


def write_checksums(directory: str | Path) -> None:
    """``SHA256SUMS`` in ``sha256sum`` format (``sha256sum -c SHA256SUMS`` checks it)."""
    directory = Path(directory)
    lines = [f"{digest}  {name}\n" for name, digest in _digests(directory).items()]
    (directory / CHECKSUMS).write_text("".join(lines))


def verify_checksums(directory: str | Path) -> list[str]:
    """Files that are missing, extra or changed against ``SHA256SUMS`` (empty: intact)."""
    directory = Path(directory)
    listed = {}
    for line in (directory / CHECKSUMS).read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    actual = _digests(directory)
    return sorted(
        name for name in listed.keys() | actual.keys() if listed.get(name) != actual.get(name)
    )


SAMPLE_SCENES = [
    Scene(garment, colour, position)
    for garment in range(len(CLASSES))
    for colour, position in [
        ("red", "top left"),
        ("blue", "bottom right"),
        ("yellow", "center"),
        ("black", "top right"),
        ("white", "bottom left"),
    ]
]


@torch.no_grad()
def sample_grid(
    model_dir: str | Path, *, steps: int = 30, guidance: float = 4.0, device: str = "cpu"
) -> Image.Image:
    """One row per garment class, one column per (colour, position) of :data:`SAMPLE_SCENES`:
    a picture of what the model learned, drawn with the float pipeline."""
    pipeline = _load_pipeline(model_dir).to(device)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        [scene.caption() for scene in SAMPLE_SCENES],
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
    ).images
    return scene_grid(images)


def scene_grid(images: list[Image.Image]) -> Image.Image:
    """The images of :data:`SAMPLE_SCENES`, one row per garment class."""
    columns = len(SAMPLE_SCENES) // len(CLASSES)
    grid = Image.new("RGB", (columns * SIZE, len(CLASSES) * SIZE))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * SIZE, (i // columns) * SIZE))
    return grid
