"""DreamBooth-style fine-tuning of TuneQDM / PEQA scales (or, for comparison, the float UNet).

The loop is written out as in diffusers' ``train_dreambooth.py``: latents → noise → per-sample
timestep → ``add_noise`` → ε (or v) target → MSE, plus the prior-preservation term on class
images the base model generated itself. Differences from the paper's code that matter:
every sample draws its own timestep and trains its own interval (batch > 1 and prior
preservation work), latents and text states are computed once, and all randomness comes from
one CPU generator saved in checkpoints, so a resumed run ends with the same adapter.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from tuneqdm_core.adapter import Adapter, AdapterConfig, param_groups
from tuneqdm_core.base import BaseModel
from tuneqdm_core.generate import GenerationRequest, generate
from tuneqdm_core.images import ImageSource, load_subject_images, open_image, to_training_tensor
from tuneqdm_core.model import quant_state
from tuneqdm_core.routing import set_route, use_adapter

FinetuneMethod = Literal["tuneqdm", "peqa", "full"]


# Relative step of s_out per optimizer step when no lr_s_out is given: measured best on the
# built-in model at 4 and 8 bits (benchmarks/quality.py, docs/benchmarks.md).
S_OUT_RELATIVE_LR = 2e-3


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings. Learning rates: ``s_out`` lives on the scale of the weights'
    quantization step, ``s_in`` around 1, so they get separate rates (docs/method.md); ``lr`` is for
    ``full`` only (DreamBooth's 5e-6).

    The quantization step differs 16× between 4 and 8 bits and from model to model, and Adam
    moves a parameter by about its learning rate per step whatever the gradient's size, so a
    fixed ``lr_s_out`` is a different relative step on every base. ``lr_s_out=None`` (the
    default) takes ``S_OUT_RELATIVE_LR`` × the base's median ``s0`` instead (see
    :func:`s_out_learning_rate`); a number is used as given."""

    method: FinetuneMethod = "tuneqdm"
    # 1, not the paper's 2: on the built-in model 2 intervals were no better at 400 steps and
    # worse at 150 (docs/benchmarks.md), and double the adapter.
    intervals: int = 1
    steps: int = 400
    lr_s_out: float | None = None
    lr_s_in: float = 1e-3
    lr: float = 5e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 1
    resolution: int = 512
    seed: int = 0
    init_sigma: float = 0.0
    gradient_checkpointing: bool = False
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    class_image_steps: int = 30
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("tuneqdm", "peqa", "full"):
            raise ValueError(f"method must be tuneqdm, peqa or full, got {self.method!r}")
        if self.steps < 1 or self.batch_size < 1 or self.resolution < 8:
            raise ValueError("steps and batch_size must be >= 1 and resolution >= 8")
        if self.checkpoint_every < 0 or self.num_class_images < 0:
            raise ValueError("checkpoint_every and num_class_images must be >= 0")

    def adapter_config(self) -> AdapterConfig:
        if self.method == "peqa":
            return AdapterConfig(method="peqa", intervals=1)
        return AdapterConfig(intervals=self.intervals, init_sigma=self.init_sigma)


def s_out_learning_rate(unet: Any, config: FinetuneConfig) -> float:
    """``config.lr_s_out``, or where it is None ``S_OUT_RELATIVE_LR`` × the median base scale
    ``s0`` of ``unet``'s quantized layers."""
    if config.lr_s_out is not None:
        return config.lr_s_out
    return S_OUT_RELATIVE_LR * float(quant_state(unet).base_scales().abs().median())


@dataclass(frozen=True)
class Subject:
    """One subject: its photos and the prompt with its identifier ("a photo of sks dog").
    ``class_prompt`` ("a photo of a dog") turns on prior preservation for it."""

    instance_prompt: str
    images: Sequence[ImageSource]
    class_prompt: str | None = None


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    loss: float
    elapsed: float
    eta: float


@dataclass
class FinetuneResult:
    adapter: Adapter | None  # None for method "full"
    unet: Any | None  # the fine-tuned float UNet for method "full"
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


class FinetuneCanceled(Exception):
    """Raised between steps when ``should_cancel()`` returned true."""

    def __init__(self, step: int) -> None:
        super().__init__(f"fine-tune canceled after step {step}")
        self.step = step


@dataclass
class _Data:
    """Everything the loop samples from, computed once."""

    mean: torch.Tensor  # [N, C, h, w] latent means (instance images, then class images)
    std: torch.Tensor
    embeds: torch.Tensor  # [P, 77, D] one per distinct prompt
    prompt_of: torch.Tensor  # [N] index into embeds
    instance: int  # the first `instance` rows are subject images
    subject_of: torch.Tensor  # [instance] subject index of each instance image
    class_rows: list[list[int]]  # per subject, rows of its class images (may be empty)


@contextmanager
def _offloaded(base: BaseModel) -> Any:
    """Move VAE and text encoder off the accelerator while the UNet trains."""
    if base.device.type == "cpu":
        yield
        return
    base.vae.to("cpu")
    base.text_encoder.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        base.vae.to(base.device)
        base.text_encoder.to(base.device)


@torch.no_grad()
def _encode_images(base: BaseModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(8):
        dist = base.vae.encode(chunk.to(base.device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def class_images(
    base: BaseModel, prompt: str, count: int, resolution: int, steps: int, cache_dir: Path | None
) -> list[ImageSource]:
    """``count`` images of ``prompt`` from the base model itself, cached per base and prompt."""
    key = hashlib.sha256(f"{base.fingerprint}|{prompt}|{resolution}|{steps}".encode()).hexdigest()
    folder = cache_dir / f"class-{key[:16]}" if cache_dir else None
    have = sorted(folder.glob("*.png")) if folder and folder.is_dir() else []
    if len(have) >= count:
        return [*have[:count]]
    request = GenerationRequest(
        prompt=prompt,
        num_images=count - len(have),
        steps=steps,
        width=resolution,
        height=resolution,
        seed=len(have),
    )
    made = [g.image for g in generate(base, [request])[0]]
    if folder is None:
        return [*have, *made]
    folder.mkdir(parents=True, exist_ok=True)
    for offset, image in enumerate(made):
        image.save(folder / f"{len(have) + offset:05d}.png")
    return [*sorted(folder.glob("*.png"))[:count]]


def _prepare(
    base: BaseModel, subjects: Sequence[Subject], config: FinetuneConfig, cache_dir: Path | None
) -> _Data:
    prompts: list[str] = []

    def prompt_index(prompt: str) -> int:
        if prompt not in prompts:
            prompts.append(prompt)
        return prompts.index(prompt)

    pixels, prompt_of, subject_of = [], [], []
    for s, subject in enumerate(subjects):
        images = load_subject_images(subject.images, config.resolution)
        pixels.append(images)
        prompt_of += [prompt_index(subject.instance_prompt)] * len(images)
        subject_of += [s] * len(images)
    instance = len(prompt_of)
    class_rows: list[list[int]] = []
    for subject in subjects:
        rows: list[int] = []
        if subject.class_prompt and config.num_class_images:
            sources = class_images(
                base,
                subject.class_prompt,
                config.num_class_images,
                config.resolution,
                config.class_image_steps,
                cache_dir,
            )
            tensors = [to_training_tensor(open_image(src), config.resolution) for src in sources]
            start = sum(p.shape[0] for p in pixels)
            pixels.append(torch.stack(tensors))
            rows = list(range(start, start + len(tensors)))
            prompt_of += [prompt_index(subject.class_prompt)] * len(tensors)
        class_rows.append(rows)
    mean, std = _encode_images(base, torch.cat(pixels))
    return _Data(
        mean=mean,
        std=std,
        embeds=base.encode_prompts(prompts),
        prompt_of=torch.tensor(prompt_of),
        instance=instance,
        subject_of=torch.tensor(subject_of),
        class_rows=class_rows,
    )


def _atomic_save(obj: Any, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # Through a Python file object, so a full disk raises OSError(ENOSPC) (as the
        # exception's context) instead of only torch's "unexpected pos" RuntimeError.
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


CHECKPOINT_NAME = "checkpoint.pt"


def _fingerprint_config(config: FinetuneConfig) -> dict[str, Any]:
    # checkpoint_every does not change the result; everything else must match to resume.
    return {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}


def finetune(
    base: BaseModel,
    subjects: Sequence[Subject],
    config: FinetuneConfig,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    should_checkpoint: Callable[[], bool] | None = None,
) -> FinetuneResult:
    """Fine-tune on ``subjects`` (several subjects share one adapter, each with its own token).

    With ``checkpoint_dir``, the state is saved every ``config.checkpoint_every`` steps, and
    after any step where ``should_checkpoint()`` is true (a worker asked to stop saves its
    state before it stops); a checkpoint found there is resumed from. ``cache_dir`` keeps
    generated class images.
    """
    if not subjects:
        raise ValueError("no subjects given")
    start_time = time.perf_counter()
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    data = _prepare(base, subjects, config, Path(cache_dir) if cache_dir else None)
    device = base.device

    adapter: Adapter | None = None
    unet = base.unet
    if config.method == "full":
        unet = UNet2DConditionModel.from_pretrained(base.source, subfolder="unet").to(device)
        unet.requires_grad_(True)
        params = list(unet.parameters())
        groups: list[dict[str, Any]] = [{"params": params, "lr": config.lr, "weight_decay": 1e-2}]
    else:
        adapter = Adapter.create(
            unet, config.adapter_config(), torch.Generator().manual_seed(config.seed)
        )
        params = list(adapter.parameters())
        lr_s_out = s_out_learning_rate(unet, config)
        groups = param_groups(adapter, lr_s_out, config.lr_s_in, config.weight_decay)
    optimizer = torch.optim.AdamW(groups)
    # fp16 gradients of small scale vectors underflow without loss scaling; bf16 needs none.
    scaler = torch.amp.GradScaler(
        device.type, enabled=config.mixed_precision == "fp16" and device.type == "cuda"
    )
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    step = 0
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, weights_only=True)
        if state["config"] != _fingerprint_config(config) or state["base"] != base.fingerprint:
            raise ValueError(f"{checkpoint}: made by another configuration or base; delete it")
        with torch.no_grad():
            for p, saved in zip(params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        scaler.load_state_dict(state["scaler"])
        losses, step = list(state["losses"]), int(state["step"])
    resumed_from = step

    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    prediction_type = noise_scheduler.config.prediction_type
    total_t = noise_scheduler.config.num_train_timesteps
    use_prior = any(data.class_rows)
    autocast = (
        torch.autocast(
            device.type, dtype=torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
        )
        if config.mixed_precision != "no" and device.type == "cuda"
        else nullcontext()
    )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    try:
        with _offloaded(base):
            while step < config.steps:
                if should_cancel is not None and should_cancel():
                    raise FinetuneCanceled(step)
                rows = torch.randint(0, data.instance, (config.batch_size,), generator=generator)
                if use_prior:
                    # Each instance sample is paired with a class image of its own subject.
                    picks = []
                    for r in rows.tolist():
                        own = data.class_rows[int(data.subject_of[r])] or [r]
                        picks.append(
                            own[int(torch.randint(0, len(own), (1,), generator=generator))]
                        )
                    rows = torch.cat([rows, torch.tensor(picks)])
                noise_draw = torch.randn(data.mean[rows].shape, generator=generator)
                latent_draw = torch.randn(data.mean[rows].shape, generator=generator)
                timesteps = torch.randint(0, total_t, (rows.shape[0],), generator=generator)
                latents = data.mean[rows] + data.std[rows] * latent_draw.to(device)
                latents = latents * base.vae.config.scaling_factor
                noise = noise_draw.to(device)
                t = timesteps.to(device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                target = (
                    noise
                    if prediction_type == "epsilon"
                    else noise_scheduler.get_velocity(latents, noise, t)
                )
                if adapter is not None:
                    use_adapter(unet, adapter, timesteps)
                with autocast:
                    prediction = unet(
                        noisy, t, encoder_hidden_states=data.embeds[data.prompt_of[rows]]
                    ).sample
                errors = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
                    dim=(1, 2, 3)
                )
                batch = config.batch_size
                loss = errors[:batch].mean()
                if use_prior:
                    loss = loss + config.prior_loss_weight * errors[batch:].mean()
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if config.max_grad_norm > 0:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in params if p.grad is not None], config.max_grad_norm
                    )
                scaler.step(optimizer)
                scaler.update()
                step += 1
                losses.append(float(loss.detach()))
                if progress is not None:
                    elapsed = time.perf_counter() - start_time
                    rate = elapsed / max(1, step - resumed_from)
                    progress(
                        Progress(
                            step, config.steps, losses[-1], elapsed, rate * (config.steps - step)
                        )
                    )
                scheduled = config.checkpoint_every and step % config.checkpoint_every == 0
                asked = should_checkpoint is not None and should_checkpoint()
                if checkpoint is not None and (scheduled or asked) and step < config.steps:
                    _atomic_save(
                        {
                            "step": step,
                            "params": [p.detach().cpu() for p in params],
                            "optimizer": optimizer.state_dict(),
                            "generator": generator.get_state(),
                            "scaler": scaler.state_dict(),
                            "losses": losses,
                            "config": _fingerprint_config(config),
                            "base": base.fingerprint,
                        },
                        checkpoint,
                    )
    finally:
        set_route(base.unet, None)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()
    if adapter is not None:
        adapter.requires_grad_(False)
    return FinetuneResult(
        adapter=adapter,
        unet=unet if config.method == "full" else None,
        losses=losses,
        seconds=time.perf_counter() - start_time,
        resumed_from=resumed_from,
    )


def loss_trend(losses: Sequence[float], window: int = 10) -> tuple[float, float]:
    """Mean loss of the first and last ``window`` steps (diffusion losses are noisy)."""
    window = max(1, min(window, math.ceil(len(losses) / 2)))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window
