"""What every family module answers: the calls the family-blind core makes on
``BaseModel.family`` (loading, text conditioning, the training target and timesteps, the
denoising call, generation, and the TAS interval of a timestep)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tuneqdm_core.model import QuantConfig, StorageMode
from tuneqdm_core.routing import ScaleBank

if TYPE_CHECKING:
    from tuneqdm_core.base import BaseModel, Conditioning
    from tuneqdm_core.generate import GeneratedImage, GenerationRequest
    from tuneqdm_core.training_data import TrainingData
    from tuneqdm_core.training_step import Batch


class Family:
    """A model family; :class:`~tuneqdm_core.families.sd.UNetFamily` (SD 1.x/2.x, SDXL) and
    :class:`~tuneqdm_core.families.flow.FlowFamily` (FLUX, SD3) implement it."""

    name = ""
    # The pipeline's folder of the denoiser ("unet" or "transformer"): what the quantized
    # cache entry is named after and what the exports tell apart.
    denoiser = "unet"

    # --- loading -------------------------------------------------------------------------

    def load(
        self,
        source: str,
        quant: QuantConfig,
        device: torch.device,
        storage_mode: StorageMode,
        cache: Path | None = None,
        config: str | None = None,
        text_encoder_bits: int | None = None,
    ) -> BaseModel:
        """The base of a folder, hub id (or, where the family reads them, one checkpoint
        file with ``config`` its configs), its denoiser quantized or read from ``cache``;
        ``text_encoder_bits``: a T5 encoder's bits where the family has one."""
        raise NotImplementedError

    # --- conditioning --------------------------------------------------------------------

    def encode(self, base: BaseModel, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    # --- training ------------------------------------------------------------------------

    def float_denoiser(self, base: BaseModel) -> Any:
        """The float denoiser method ``full`` fine-tunes."""
        raise ValueError(f"method 'full' fine-tunes a UNet; {self.name} has a transformer")

    def training_scheduler(self, base: BaseModel) -> Any:
        raise NotImplementedError

    def draw_timesteps(
        self, count: int, generator: torch.Generator, scheduler: Any
    ) -> torch.Tensor:
        """``count`` training timesteps (or sigmas) from ``generator``."""
        raise NotImplementedError

    @staticmethod
    def tas_timesteps(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> Any:
        """Timesteps of :meth:`draw_timesteps` on an adapter's ``[0, T)`` axis (a route's)."""
        raise NotImplementedError

    def training_inputs(
        self, base: BaseModel, data: TrainingData, batch: Batch, scheduler: Any
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """(noisy latents, target, model inputs) of a batch; the inputs are tensors or dicts
        of tensors with one row per sample (co-training concatenates its jobs' inputs)."""
        raise NotImplementedError

    def denoise(
        self, base: BaseModel, model: Any, noisy: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        """The prediction of ``model`` for ``noisy`` with :meth:`training_inputs`' inputs."""
        raise NotImplementedError

    # --- generation ----------------------------------------------------------------------

    def check_request(self, base: BaseModel, request: GenerationRequest) -> None:
        raise NotImplementedError

    def generate(
        self,
        base: BaseModel,
        requests: Sequence[GenerationRequest],
        *,
        bank: ScaleBank | None,
        on_step: Callable[[int, int], None] | None,
        dtype: torch.dtype | None,
        should_cancel: Callable[[], bool] | None,
    ) -> list[list[GeneratedImage]]:
        raise NotImplementedError
