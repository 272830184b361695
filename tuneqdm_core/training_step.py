"""One fine-tuning step and what it works on: the trained parameters with their optimizer
and random generator (:class:`TrainingRun`), one step's random draws (:class:`Batch`), the
noised latents and their target, the loss, and the UNet's training mode with VAE and text
encoders offloaded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tuneqdm_core.adapter import Adapter, param_groups
from tuneqdm_core.base import BaseModel, Conditioning
from tuneqdm_core.families.sd import noisy_latents as noisy_latents  # SD's, re-exported
from tuneqdm_core.finetune_config import FinetuneConfig, s_out_learning_rate
from tuneqdm_core.lora import LoRA
from tuneqdm_core.routing import route_adapters, routed
from tuneqdm_core.training_data import TrainingData


@dataclass
class TrainingRun:
    """What one fine-tune trains and the state a checkpoint saves."""

    unet: Any  # the quantized base UNet, or a float copy for method "full"
    adapter: Adapter | None
    lora: LoRA | None  # method "lora"
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    losses: list[float] = field(default_factory=list)
    step: int = 0


@dataclass(frozen=True)
class Batch:
    """One step's draws: data rows (instance rows, then their paired class rows), noise."""

    rows: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor
    timesteps: torch.Tensor


def start_run(base: BaseModel, config: FinetuneConfig) -> TrainingRun:
    """The trained parameters (a fresh adapter, or the float UNet), optimizer and generator."""
    device = base.device
    adapter: Adapter | None = None
    lora: LoRA | None = None
    unet = base.unet
    if config.method == "full":
        unet = base.family.float_denoiser(base)
        unet.requires_grad_(True)
        params = list(unet.parameters())
        groups: list[dict[str, Any]] = [{"params": params, "lr": config.lr, "weight_decay": 1e-2}]
    elif config.method == "lora":
        lora = LoRA(unet, config.lora_rank, torch.Generator().manual_seed(config.seed)).to(device)
        params = list(lora.parameters())
        # diffusers' DreamBooth LoRA scripts' AdamW weight decay.
        groups = [{"params": params, "lr": config.lr_lora, "weight_decay": 1e-4}]
    else:
        adapter = Adapter.create(
            unet,
            config.adapter_config(base.num_train_timesteps),
            torch.Generator().manual_seed(config.seed),
        )
        params = list(adapter.parameters())
        lr_s_out = s_out_learning_rate(unet, config)
        groups = param_groups(adapter, lr_s_out, config.lr_s_in, config.weight_decay)
    # fp16 gradients of small scale vectors underflow without loss scaling; bf16 needs none.
    scaler = torch.amp.GradScaler(
        device.type, enabled=config.mixed_precision == "fp16" and device.type == "cuda"
    )
    return TrainingRun(
        unet=unet,
        adapter=adapter,
        lora=lora,
        params=params,
        optimizer=torch.optim.AdamW(groups),
        scaler=scaler,
        generator=torch.Generator().manual_seed(config.seed),
    )


def draw_batch(
    data: TrainingData,
    config: FinetuneConfig,
    generator: torch.Generator,
    total_t: int,
    schedule: Any = None,
) -> Batch:
    """Rows, noises and timesteps of one step, all from ``generator`` in a fixed order (what
    makes a resumed run end with the same adapter). ``schedule`` (the family and its
    scheduler, see :func:`training_schedule`): the family draws the timesteps (a transformer
    family's are sigmas); without it, DDPM timesteps uniform in ``[0, total_t)``."""
    rows = torch.randint(0, data.instance, (config.batch_size,), generator=generator)
    if any(data.class_rows):
        # Each instance sample is paired with a class image of its own subject.
        picks = []
        for r in rows.tolist():
            own = data.class_rows[int(data.subject_of[r])] or [r]
            picks.append(own[int(torch.randint(0, len(own), (1,), generator=generator))])
        rows = torch.cat([rows, torch.tensor(picks)])
    noise = torch.randn(data.mean[rows].shape, generator=generator)
    latent_noise = torch.randn(data.mean[rows].shape, generator=generator)
    if schedule is not None:
        family, scheduler = schedule
        return Batch(
            rows, noise, latent_noise, family.draw_timesteps(rows.shape[0], generator, scheduler)
        )
    timesteps = torch.randint(0, total_t, (rows.shape[0],), generator=generator)
    return Batch(rows, noise, latent_noise, timesteps)


def training_autocast(config: FinetuneConfig, device: torch.device) -> Any:
    if config.mixed_precision == "no" or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def training_loss(
    prediction: torch.Tensor, target: torch.Tensor, config: FinetuneConfig
) -> torch.Tensor:
    """Instance MSE, plus ``prior_loss_weight`` × the class images' MSE when the batch carries
    them (its second half)."""
    # At least float32 (mixed precision); a float64 model keeps float64 (exactness tests).
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    errors = F.mse_loss(prediction.to(dtype), target.to(dtype), reduction="none").mean(
        dim=(1, 2, 3)
    )
    loss = errors[: config.batch_size].mean()
    if errors.shape[0] > config.batch_size:
        loss = loss + config.prior_loss_weight * errors[config.batch_size :].mean()
    return loss


def _optimizer_step(run: TrainingRun, loss: torch.Tensor, max_grad_norm: float) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if max_grad_norm > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.params if p.grad is not None], max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def training_schedule(base: BaseModel) -> tuple[Any, int, Any]:
    """(noise scheduler, its training timesteps, the family schedule :func:`draw_batch`
    takes)."""
    scheduler = base.family.training_scheduler(base)
    return scheduler, int(scheduler.config.num_train_timesteps), (base.family, scheduler)


def flow_inputs(
    base: BaseModel, data: TrainingData, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    """A transformer family's (noisy latents, target, conditioning) of a batch drawn with its
    schedule (``batch.timesteps`` are sigmas)."""
    return base.family.flow_inputs(base, data, batch)


def train_step(
    base: BaseModel,
    run: TrainingRun,
    data: TrainingData,
    batch: Batch,
    noise_scheduler: Any,
    config: FinetuneConfig,
) -> float:
    """One optimizer step on ``batch``; returns its loss."""
    family = base.family
    noisy, target, inputs = family.training_inputs(base, data, batch, noise_scheduler)
    route = None
    if run.adapter is not None:
        total = run.adapter.config.num_train_timesteps
        route = route_adapters([run.adapter], family.tas_timesteps(batch.timesteps, total))
    # The backward stays inside: checkpointing reads the route again there.
    with routed(base.unet, route):
        with training_autocast(config, base.device):
            prediction = family.denoise(base, run.unet, noisy, inputs)
        loss = training_loss(prediction, target, config)
        _optimizer_step(run, loss, config.max_grad_norm)
    return float(loss.detach())


@contextmanager
def _offloaded(base: BaseModel) -> Any:
    """Move VAE and text encoder off the accelerator while the UNet trains."""
    if base.device.type == "cpu":
        yield
        return
    for module in (base.vae, *base.text_encoders):
        module.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for module in (base.vae, *base.text_encoders):
            module.to(base.device)


@contextmanager
def training_mode(base: BaseModel, unet: Any, config: FinetuneConfig) -> Iterator[None]:
    """``unet`` in train mode (checkpointing on if asked), VAE and text encoder offloaded."""
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    try:
        with _offloaded(base):
            yield
    finally:
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()
