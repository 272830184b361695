"""Fine-tuning settings (:class:`FinetuneConfig`) and the learning rate of ``s_out`` they imply."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, get_args

import torch

from tuneqdm_core.adapter import AdapterConfig
from tuneqdm_core.model import quant_state

# "lora" and "full" are the baselines the benchmarks compare with (the service trains
# tuneqdm and peqa adapters): LoRA on the same quantized base (tuneqdm_core.lora), and the
# float denoiser itself (DreamBooth).
FinetuneMethod = Literal["tuneqdm", "peqa", "lora", "full"]
# The methods that train no scale adapter: nothing to sample progress images with, nothing to
# route per job in a co-training group's shared forward pass.
ADAPTERLESS_METHODS: tuple[FinetuneMethod, ...] = ("lora", "full")
# "auto": bf16 on CUDA (fp16 where the GPU has no bf16), none elsewhere (FinetuneConfig.for_device).
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]


# Relative step of s_out per optimizer step when no lr_s_out is given: measured best on the
# built-in model at 4 and 8 bits (benchmarks/quality.py, docs/benchmarks.md).
S_OUT_RELATIVE_LR = 2e-3
# Steps of a fine-tune that gives none: 300, not the paper's 400. On the built-in model 400
# steps let the photos' backgrounds leak into prompts that name other colours (prompt
# fidelity 0.93 × the base's); 300 kept it within 5 % of the base on both photo sets with
# subject fidelity no lower (docs/benchmarks.md, "Default recipe").
DEFAULT_STEPS = 300


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
    steps: int = DEFAULT_STEPS
    lr_s_out: float | None = None
    lr_s_in: float = 1e-3
    lr: float = 5e-6
    # method "lora": its rank and rate (diffusers' DreamBooth LoRA scripts' 1e-4).
    lora_rank: int = 16
    lr_lora: float = 1e-4
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
        if self.method not in get_args(FinetuneMethod):
            raise ValueError(f"method must be tuneqdm, peqa, lora or full, got {self.method!r}")
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

    def adapter_config(self, num_train_timesteps: int = 1000) -> AdapterConfig:
        """The adapter this recipe trains, its intervals splitting the scheduler's
        ``num_train_timesteps``."""
        if self.method == "peqa":
            return AdapterConfig(
                method="peqa", intervals=1, num_train_timesteps=num_train_timesteps
            )
        return AdapterConfig(
            intervals=self.intervals,
            init_sigma=self.init_sigma,
            num_train_timesteps=num_train_timesteps,
        )


def s_out_learning_rate(unet: Any, config: FinetuneConfig) -> float:
    """``config.lr_s_out``, or where it is None ``S_OUT_RELATIVE_LR`` × the median base scale
    ``s0`` of ``unet``'s quantized layers."""
    if config.lr_s_out is not None:
        return config.lr_s_out
    return S_OUT_RELATIVE_LR * float(quant_state(unet).base_scales().abs().median())
