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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

from tuneqdm_core.adapter import Adapter, AdapterConfig, param_groups
from tuneqdm_core.base import BaseModel, Conditioning, time_ids
from tuneqdm_core.cancel import Canceled, cancel_checks
from tuneqdm_core.generate import GenerationRequest, Precision, generate
from tuneqdm_core.images import (
    ImageSource,
    load_subject_images,
    open_image,
    to_training_tensor,
    training_crop,
)
from tuneqdm_core.model import quant_state
from tuneqdm_core.routing import route_adapters, routed

FinetuneMethod = Literal["tuneqdm", "peqa", "full"]
# "auto": bf16 on CUDA (fp16 where the GPU has no bf16), none elsewhere (FinetuneConfig.for_device).
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]


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
    # None: on for CUDA (activation memory is what limits a GPU), off elsewhere (it only
    # costs time there). Resolved by for_device().
    gradient_checkpointing: bool | None = None
    mixed_precision: MixedPrecision = "auto"
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
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(
                f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}"
            )

    def for_device(self, device: torch.device | str) -> FinetuneConfig:
        """This config with the device-dependent defaults (``mixed_precision="auto"``,
        ``gradient_checkpointing=None``) made concrete for ``device``."""
        cuda = torch.device(device).type == "cuda"
        precision = self.mixed_precision
        if precision == "auto":
            precision = "no" if not cuda else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        checkpointing = self.gradient_checkpointing
        if checkpointing is None:
            checkpointing = cuda
        return replace(self, mixed_precision=precision, gradient_checkpointing=checkpointing)

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


@dataclass(frozen=True)
class Sampling:
    """Images to look at while training: after every ``every`` steps and after the last one,
    one image per prompt from the adapter as trained so far. Prompt ``i`` always uses seed
    ``seed + i``, so the images of one prompt differ only by the training between them.
    Sampling draws no number from the training's generator: the adapter is the same with or
    without it."""

    prompts: Sequence[str]
    every: int
    size: int
    steps: int = 20
    seed: int = 0
    guidance_scale: float = 7.5
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        if not self.prompts or self.every < 1 or self.steps < 1 or self.size < 8:
            raise ValueError("sampling needs prompts, every >= 1, steps >= 1 and size >= 8")

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total


@dataclass
class FinetuneResult:
    adapter: Adapter | None  # None for method "full"
    unet: Any | None  # the fine-tuned float UNet for method "full"
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


class FinetuneCanceled(Canceled):
    """Raised when ``should_cancel()`` returned true: between steps, inside a UNet call
    (:mod:`tuneqdm_core.cancel`) or between chunks of class images. ``step`` is the last
    completed step."""

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
    # SDXL only: the pooled text embedding per prompt [P, E] and the time ids per row [N, 6].
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


def _unet_inputs(base: BaseModel, data: _Data, rows: torch.Tensor) -> dict[str, Any]:
    """The UNet's conditioning keyword arguments for data ``rows`` (base.unet_inputs)."""
    prompts = data.prompt_of[rows]
    if data.time_ids is None:
        return {"encoder_hidden_states": data.embeds[prompts]}
    return base.unet_inputs(Conditioning(data.embeds, data.pooled)[prompts], data.time_ids[rows])


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


@torch.no_grad()
def _encode_images(base: BaseModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for chunk in pixels.split(8):
        dist = base.vae.encode(chunk.to(base.device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# Class images per generate() call: progress, cancel checks and the cache advance per chunk
# instead of once after up to 1000 images.
CLASS_IMAGE_CHUNK = 4


def class_images(
    base: BaseModel,
    prompt: str,
    count: int,
    resolution: int,
    steps: int,
    cache_dir: Path | None,
    *,
    should_cancel: Callable[[], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
    chunk: int = CLASS_IMAGE_CHUNK,
) -> list[ImageSource]:
    """``count`` images of ``prompt`` from the base model itself, cached per base and prompt.

    Made ``chunk`` at a time; each chunk is saved before the next starts, so a canceled or
    interrupted job keeps what it made. Image ``n`` always has seed ``n``, so chunking does not
    change the images. ``progress(done, count)`` is called after each chunk; ``should_cancel``
    as in :func:`~tuneqdm_core.generate.generate` (raises
    :class:`~tuneqdm_core.cancel.Canceled`)."""
    key = hashlib.sha256(f"{base.fingerprint}|{prompt}|{resolution}|{steps}".encode()).hexdigest()
    folder = cache_dir / f"class-{key[:16]}" if cache_dir else None
    have: list[ImageSource] = [*sorted(folder.glob("*.png"))] if folder and folder.is_dir() else []
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    while len(have) < count:
        if progress is not None:
            progress(len(have), count)
        request = GenerationRequest(
            prompt=prompt,
            num_images=min(chunk, count - len(have)),
            steps=steps,
            width=resolution,
            height=resolution,
            seed=len(have),
        )
        made = [g.image for g in generate(base, [request], should_cancel=should_cancel)[0]]
        if folder is None:
            have += made
            continue
        for image in made:
            # Written under a temporary name and renamed: a killed worker leaves no half PNG.
            path = folder / f"{len(have):05d}.png"
            tmp = folder / f".{path.name}.tmp"
            image.save(tmp, format="PNG")
            os.replace(tmp, path)
            have.append(path)
    if progress is not None:
        progress(min(len(have), count), count)
    return have[:count]


def _prepare(
    base: BaseModel,
    subjects: Sequence[Subject],
    config: FinetuneConfig,
    cache_dir: Path | None,
    should_cancel: Callable[[], bool] | None = None,
    on_class_images: Callable[[int, int], None] | None = None,
) -> _Data:
    prompts: list[str] = []

    def prompt_index(prompt: str) -> int:
        if prompt not in prompts:
            prompts.append(prompt)
        return prompts.index(prompt)

    pixels, prompt_of, subject_of = [], [], []
    # SDXL's time ids per row: each photo's original size and where its crop lies.
    res = config.resolution
    ids: list[list[int]] = []
    for s, subject in enumerate(subjects):
        images = load_subject_images(subject.images, res)
        pixels.append(images)
        prompt_of += [prompt_index(subject.instance_prompt)] * len(images)
        subject_of += [s] * len(images)
        if base.is_xl:
            for source in subject.images:
                width, height = open_image(source).size
                _, left, top = training_crop((width, height), res)
                ids.append(time_ids((height, width), (top, left), (res, res)))
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
                should_cancel=should_cancel,
                progress=on_class_images,
            )
            tensors = [to_training_tensor(open_image(src), config.resolution) for src in sources]
            start = sum(p.shape[0] for p in pixels)
            pixels.append(torch.stack(tensors))
            rows = list(range(start, start + len(tensors)))
            prompt_of += [prompt_index(subject.class_prompt)] * len(tensors)
            # Made by the base at the training size: nothing cropped.
            ids += [time_ids((res, res), (0, 0), (res, res))] * len(tensors)
        class_rows.append(rows)
    mean, std = _encode_images(base, torch.cat(pixels))
    conditioning = base.encode(prompts)
    return _Data(
        mean=mean,
        std=std,
        embeds=conditioning.states,
        prompt_of=torch.tensor(prompt_of),
        instance=instance,
        subject_of=torch.tensor(subject_of),
        class_rows=class_rows,
        pooled=conditioning.pooled,
        time_ids=torch.tensor(ids, dtype=torch.float32) if base.is_xl else None,
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


@dataclass
class _Run:
    """What one fine-tune trains and the state a checkpoint saves."""

    unet: Any  # the quantized base UNet, or a float copy for method "full"
    adapter: Adapter | None
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    losses: list[float] = field(default_factory=list)
    step: int = 0


@dataclass(frozen=True)
class _Batch:
    """One step's draws: data rows (instance rows, then their paired class rows), noise."""

    rows: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor
    timesteps: torch.Tensor


def _start(base: BaseModel, config: FinetuneConfig) -> _Run:
    """The trained parameters (a fresh adapter, or the float UNet), optimizer and generator."""
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
    # fp16 gradients of small scale vectors underflow without loss scaling; bf16 needs none.
    scaler = torch.amp.GradScaler(
        device.type, enabled=config.mixed_precision == "fp16" and device.type == "cuda"
    )
    return _Run(
        unet=unet,
        adapter=adapter,
        params=params,
        optimizer=torch.optim.AdamW(groups),
        scaler=scaler,
        generator=torch.Generator().manual_seed(config.seed),
    )


def _save_checkpoint(run: _Run, path: Path, config: FinetuneConfig, base: BaseModel) -> None:
    _atomic_save(
        {
            "step": run.step,
            "params": [p.detach().cpu() for p in run.params],
            "optimizer": run.optimizer.state_dict(),
            "generator": run.generator.get_state(),
            "scaler": run.scaler.state_dict(),
            "losses": run.losses,
            "config": _fingerprint_config(config),
            "base": base.fingerprint,
        },
        path,
    )


def _restore_checkpoint(run: _Run, path: Path, config: FinetuneConfig, base: BaseModel) -> None:
    state = torch.load(path, weights_only=True)
    if state["config"] != _fingerprint_config(config) or state["base"] != base.fingerprint:
        raise ValueError(f"{path}: made by another configuration or base; delete it")
    with torch.no_grad():
        for p, saved in zip(run.params, state["params"], strict=True):
            p.copy_(saved)
    run.optimizer.load_state_dict(state["optimizer"])
    run.generator.set_state(state["generator"])
    run.scaler.load_state_dict(state["scaler"])
    run.losses, run.step = list(state["losses"]), int(state["step"])


def _checkpoint_due(config: FinetuneConfig, step: int) -> bool:
    # The last step saves nothing: the caller writes the adapter itself.
    every = config.checkpoint_every
    return every > 0 and step % every == 0 and step < config.steps


def _draw_batch(
    data: _Data, config: FinetuneConfig, generator: torch.Generator, total_t: int
) -> _Batch:
    """Rows, noises and timesteps of one step, all from ``generator`` in a fixed order (what
    makes a resumed run end with the same adapter)."""
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
    timesteps = torch.randint(0, total_t, (rows.shape[0],), generator=generator)
    return _Batch(rows, noise, latent_noise, timesteps)


def _noisy_latents(
    base: BaseModel, data: _Data, batch: _Batch, noise_scheduler: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps, target) on the device: a latent sampled from each image's
    VAE posterior, noised at its timestep; the target is ε or v by the scheduler's type."""
    device = base.device
    latents = data.mean[batch.rows] + data.std[batch.rows] * batch.latent_noise.to(device)
    latents = latents * base.vae.config.scaling_factor
    noise = batch.noise.to(device)
    t = batch.timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    if noise_scheduler.config.prediction_type == "epsilon":
        return noisy, t, noise
    return noisy, t, noise_scheduler.get_velocity(latents, noise, t)


def _autocast(config: FinetuneConfig, device: torch.device) -> Any:
    if config.mixed_precision == "no" or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if config.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _loss(prediction: torch.Tensor, target: torch.Tensor, config: FinetuneConfig) -> torch.Tensor:
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


def _optimizer_step(run: _Run, loss: torch.Tensor, max_grad_norm: float) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if max_grad_norm > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_([p for p in run.params if p.grad is not None], max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()


def _train_step(
    base: BaseModel,
    run: _Run,
    data: _Data,
    batch: _Batch,
    noise_scheduler: Any,
    config: FinetuneConfig,
) -> float:
    """One optimizer step on ``batch``; returns its loss."""
    noisy, t, target = _noisy_latents(base, data, batch, noise_scheduler)
    route = None if run.adapter is None else route_adapters([run.adapter], batch.timesteps)
    # The backward stays inside: checkpointing reads the route again there.
    with routed(base.unet, route):
        with _autocast(config, base.device):
            prediction = run.unet(noisy, t, **_unet_inputs(base, data, batch.rows)).sample
        loss = _loss(prediction, target, config)
        _optimizer_step(run, loss, config.max_grad_norm)
    return float(loss.detach())


@contextmanager
def _training(base: BaseModel, unet: Any, config: FinetuneConfig) -> Iterator[None]:
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


@contextmanager
def _inference(base: BaseModel, unet: Any) -> Iterator[None]:
    """Inside ``_training``: ``unet`` in eval mode with VAE and text encoder back on the
    accelerator for a moment, then training mode and offloading again."""
    unet.eval()
    if base.device.type != "cpu":
        base.vae.to(base.device)
        base.text_encoder.to(base.device)
    try:
        yield
    finally:
        if base.device.type != "cpu":
            base.vae.to("cpu")
            base.text_encoder.to("cpu")
            torch.cuda.empty_cache()
        unet.train()


def _sample(
    base: BaseModel,
    run: _Run,
    sampling: Sampling,
    on_step: Callable[[int, int], None] | None,
) -> list[Image.Image]:
    """One image per prompt with the current adapter (cancel checks are the training's)."""
    requests = [
        GenerationRequest(
            prompt=prompt,
            adapter=run.adapter,
            steps=sampling.steps,
            guidance_scale=sampling.guidance_scale,
            seed=sampling.seed + i,
            width=sampling.size,
            height=sampling.size,
        )
        for i, prompt in enumerate(sampling.prompts)
    ]
    with _inference(base, run.unet):
        made = generate(base, requests, on_step=on_step, precision=sampling.precision)
    return [images[0].image for images in made]


def finetune(
    base: BaseModel,
    subjects: Sequence[Subject],
    config: FinetuneConfig,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    on_class_images: Callable[[int, int], None] | None = None,
    should_pause: Callable[[], bool] | None = None,
    sampling: Sampling | None = None,
    on_sample: Callable[[int, list[Image.Image]], None] | None = None,
    on_sample_step: Callable[[int, int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune on ``subjects`` (several subjects share one adapter, each with its own token).

    With ``checkpoint_dir``, the state is saved every ``config.checkpoint_every`` steps and a
    checkpoint found there is resumed from. ``cache_dir`` keeps generated class images.
    ``should_cancel`` is asked before every UNet block (training and class images) and
    between steps; when true, :class:`FinetuneCanceled` is raised. ``should_pause`` is asked
    after every step only: when true, the state is checkpointed and FinetuneCanceled raised, so
    a resumed run continues exactly where this one paused (a worker asked to stop).
    ``on_class_images(done, total)`` reports the class images of prior preservation as they are
    made.

    With ``sampling``, ``on_sample(step, images)`` receives one image per prompt at the steps
    :meth:`Sampling.due` names, before that step's checkpoint (so a run resumed from a
    checkpoint never skips the samples of its step; it may repeat those of later steps);
    ``on_sample_step(done, total)`` reports its denoising steps. ``should_cancel`` stops
    sampling too.
    """
    if not subjects:
        raise ValueError("no subjects given")
    if sampling is not None and config.method == "full":
        raise ValueError("sampling needs an adapter; method full trains none")
    config = config.for_device(base.device)
    start_time = time.perf_counter()
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
    try:
        data = _prepare(
            base,
            subjects,
            config,
            Path(cache_dir) if cache_dir else None,
            should_cancel,
            on_class_images,
        )
    except FinetuneCanceled:
        raise
    except Canceled:
        raise FinetuneCanceled(0) from None
    run = _start(base, config)
    if checkpoint is not None and checkpoint.is_file():
        _restore_checkpoint(run, checkpoint, config, base)
    resumed_from = run.step
    noise_scheduler = DDPMScheduler.from_config(base.scheduler_config)
    total_t = noise_scheduler.config.num_train_timesteps
    with _training(base, run.unet, config), cancel_checks(run.unet, should_cancel):
        while run.step < config.steps:
            if should_cancel is not None and should_cancel():
                raise FinetuneCanceled(run.step)
            batch = _draw_batch(data, config, run.generator, total_t)
            try:
                loss = _train_step(base, run, data, batch, noise_scheduler, config)
            except FinetuneCanceled:
                raise
            except Canceled:
                # Stopped inside the UNet (or its recomputation in backward): this step never
                # happened; the last checkpoint stays the place to resume from.
                raise FinetuneCanceled(run.step) from None
            run.losses.append(loss)
            run.step += 1
            if progress is not None:
                elapsed = time.perf_counter() - start_time
                rate = elapsed / max(1, run.step - resumed_from)
                eta = rate * (config.steps - run.step)
                progress(Progress(run.step, config.steps, run.losses[-1], elapsed, eta))
            if sampling is not None and sampling.due(run.step, config.steps):
                try:
                    images = _sample(base, run, sampling, on_sample_step)
                except FinetuneCanceled:
                    raise
                except Canceled:
                    # The step itself is done but not checkpointed: resuming repeats it.
                    raise FinetuneCanceled(run.step) from None
                if on_sample is not None:
                    on_sample(run.step, images)
            due = _checkpoint_due(config, run.step)
            if checkpoint is not None and due:
                _save_checkpoint(run, checkpoint, config, base)
            if should_pause is not None and run.step < config.steps and should_pause():
                if checkpoint is not None and not due:
                    _save_checkpoint(run, checkpoint, config, base)
                raise FinetuneCanceled(run.step)
    if run.adapter is not None:
        run.adapter.requires_grad_(False)
    return FinetuneResult(
        adapter=run.adapter,
        unet=run.unet if config.method == "full" else None,
        losses=run.losses,
        seconds=time.perf_counter() - start_time,
        resumed_from=resumed_from,
    )


def loss_trend(losses: Sequence[float], window: int = 10) -> tuple[float, float]:
    """Mean loss of the first and last ``window`` steps (diffusion losses are noisy)."""
    window = max(1, min(window, math.ceil(len(losses) / 2)))
    return sum(losses[:window]) / window, sum(losses[-window:]) / window
