"""Stable Diffusion 1.x / 2.x: a UNet trained on DDPM timesteps, and what SDXL shares.

Loading reads a diffusers folder or hub id (``unet``, ``vae``, ``text_encoder``,
``tokenizer``, ``scheduler``) or one original-layout checkpoint file through diffusers'
``from_single_file`` (configs from ``config``); conditioning is the text encoder's last hidden
states; training draws a uniform DDPM timestep per sample and noises a latent sampled from the
VAE posterior with the scheduler's ``add_noise``, the target ε or v by the scheduler's
``prediction_type``; generation runs one classifier-free-guidance loop of DDIM, DPM-Solver++
or Euler over many requests. A timestep is already on an adapter's ``[0, T)`` axis: its TAS
interval is ``⌊t·n/T⌋`` of the DDPM timestep itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from tuneqdm_core.base import (
    BaseModel,
    Conditioning,
    is_single_file,
    load_quantized_unet,
    save_quantized_unet,
)
from tuneqdm_core.cancel import cancel_checks
from tuneqdm_core.families.base import Family
from tuneqdm_core.images import to_pil
from tuneqdm_core.model import QuantConfig, StorageMode, quantize_, set_storage_mode
from tuneqdm_core.routing import ScaleBank, routed

if TYPE_CHECKING:
    from tuneqdm_core.generate import GeneratedImage, GenerationRequest
    from tuneqdm_core.training_data import TrainingData
    from tuneqdm_core.training_step import Batch

SCHEDULERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "ddim": lambda config: DDIMScheduler.from_config(config),
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++"
    ),
    "euler": lambda config: EulerDiscreteScheduler.from_config(config),
}


def noisy_latents(
    base: BaseModel, data: TrainingData, batch: Batch, noise_scheduler: Any
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


def scheduler_config(source: str) -> dict[str, Any]:
    scheduler_path = Path(source) / "scheduler" / "scheduler_config.json"
    if scheduler_path.is_file():
        return dict(json.loads(scheduler_path.read_text()))
    return dict(DDIMScheduler.load_config(source, subfolder="scheduler"))


class UNetFamily(Family):
    """SD 1.x / 2.x (module docstring); :class:`~tuneqdm_core.families.sdxl.SDXLFamily`
    adds what SDXL's UNet takes on top."""

    name = "sd"
    denoiser = "unet"

    # --- loading -------------------------------------------------------------------------

    def single_file_pipeline(self, source: str, options: dict[str, Any]) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_single_file(
            source,
            **options,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def more_encoders(self, source: str, device: torch.device) -> tuple[Any, Any, bool]:
        """A folder's (second text encoder, its tokenizer, zero_empty_negative): none for SD."""
        return None, None, False

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
        if text_encoder_bits is not None:
            raise ValueError(
                f"text_encoder_bits quantizes the T5 encoder of a FLUX or SD3 base; {source!r} "
                "has none (its CLIP encoders are small): leave it unset"
            )
        start = time.perf_counter()
        pipeline = None
        if is_single_file(source):
            local = config is not None and Path(config).is_dir()
            # Weights as the folder path loads them (fp16 checkpoints would stay fp16 otherwise).
            options: dict[str, Any] = {
                "config": config,
                "local_files_only": local,
                "torch_dtype": torch.float32,
            }
            pipeline = self.single_file_pipeline(source, options).to(device)
        from_cache = cache is not None and (cache / "meta.json").is_file()
        if cache is not None and from_cache:
            unet = load_quantized_unet(cache, device)
        else:
            if pipeline is not None:
                unet = pipeline.unet
            else:
                unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet").to(device)
            quantize_(unet, quant)
            if cache is not None:
                save_quantized_unet(unet, cache, source)
        unet.eval()
        set_storage_mode(unet, storage_mode)
        text_encoder_2 = tokenizer_2 = None
        if pipeline is not None:
            vae, text_encoder, tokenizer = pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
            text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
            tokenizer_2 = getattr(pipeline, "tokenizer_2", None)
            zero_empty_negative = bool(pipeline.config.get("force_zeros_for_empty_prompt", False))
            schedule = dict(pipeline.scheduler.config)
            del pipeline  # a cached UNet leaves the float one to be freed here
        else:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae").to(device)
            text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder").to(
                device
            )
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
            text_encoder_2, tokenizer_2, zero_empty_negative = self.more_encoders(source, device)
            schedule = scheduler_config(source)
        vae.eval()
        for module in (vae, text_encoder, text_encoder_2):
            if module is not None:
                module.eval()
                module.requires_grad_(False)
        return BaseModel(
            source=source,
            unet=unet,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler_config=schedule,
            quant=quant,
            device=device,
            load_seconds=time.perf_counter() - start,
            from_cache=from_cache,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            zero_empty_negative=zero_empty_negative,
            family=self,
        )

    # --- conditioning --------------------------------------------------------------------

    def encode(self, base: BaseModel, prompts: list[str]) -> Conditioning:
        """The text encoder's last hidden states."""
        return Conditioning(self._run_encoder(base, base.tokenizer, base.text_encoder, prompts)[0])

    @staticmethod
    def _run_encoder(
        base: BaseModel,
        tokenizer: Any,
        encoder: Any,
        prompts: list[str],
        hidden_states: bool = False,
    ) -> Any:
        tokens = tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = next(encoder.parameters()).device
        if not hidden_states:  # SD 1.x/2.x: the call as it always was
            return [encoder(tokens.input_ids.to(device))[0].to(base.device)]
        return encoder(tokens.input_ids.to(device), output_hidden_states=True)

    def unet_inputs(
        self, base: BaseModel, conditioning: Conditioning, time_ids: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for a batch: the text states."""
        return {"encoder_hidden_states": conditioning.states}

    # --- training ------------------------------------------------------------------------

    def float_denoiser(self, base: BaseModel) -> Any:
        return UNet2DConditionModel.from_pretrained(base.source, subfolder="unet").to(base.device)

    def training_scheduler(self, base: BaseModel) -> Any:
        return DDPMScheduler.from_config(base.scheduler_config)

    def draw_timesteps(
        self, count: int, generator: torch.Generator, scheduler: Any
    ) -> torch.Tensor:
        total = int(scheduler.config.num_train_timesteps)
        return torch.randint(0, total, (count,), generator=generator)

    @staticmethod
    def tas_timesteps(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> Any:
        return timesteps  # DDPM timesteps are the adapter's axis

    def training_inputs(
        self, base: BaseModel, data: TrainingData, batch: Batch, scheduler: Any
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        from tuneqdm_core.training_data import unet_inputs

        noisy, t, target = noisy_latents(base, data, batch, scheduler)
        return noisy, target, {"timestep": t, **unet_inputs(base, data, batch.rows)}

    def denoise(
        self, base: BaseModel, model: Any, noisy: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        return model(noisy, **inputs).sample

    # --- generation ----------------------------------------------------------------------

    def check_request(self, base: BaseModel, request: GenerationRequest) -> None:
        factor = base.vae_scale_factor
        if request.scheduler not in SCHEDULERS:
            raise ValueError(
                f"scheduler {request.scheduler!r} unknown; choose from {sorted(SCHEDULERS)}"
            )
        if (
            request.width % factor
            or request.height % factor
            or min(request.width, request.height) < 8
        ):
            raise ValueError(
                f"width and height must be multiples of {factor} and at least 8, "
                f"got {request.width}x{request.height}"
            )
        if request.num_images < 1 or request.steps < 1:
            raise ValueError("num_images and steps must be at least 1")

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
        """Images for each request: requests grouped by ``loop_key``, one loop per group."""
        for request in requests:
            self.check_request(base, request)
        results: list[list[GeneratedImage]] = [[] for _ in requests]
        groups: dict[tuple[int, int, int, str], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(request.loop_key(), []).append(index)
        for indices in groups.values():
            autocast = (
                torch.autocast(base.device.type, dtype=dtype)
                if dtype is not None
                else nullcontext()
            )
            with autocast, cancel_checks(base.unet, should_cancel):
                images = self._run_loop(base, [requests[i] for i in indices], bank, on_step)
            for i, group_images in zip(indices, images, strict=True):
                results[i] = group_images
        return results

    def loop_inputs(
        self,
        base: BaseModel,
        negatives: list[str],
        prompts: list[str],
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """The UNet's conditioning of a guidance batch: negative rows, then prompt rows."""
        return self.unet_inputs(base, base.encode(negatives + prompts))

    def _run_loop(
        self,
        base: BaseModel,
        requests: Sequence[GenerationRequest],
        bank: ScaleBank | None,
        on_step: Callable[[int, int], None] | None,
    ) -> list[list[GeneratedImage]]:
        from tuneqdm_core.generate import GeneratedImage, slots_for

        first = requests[0]
        scheduler = SCHEDULERS[first.scheduler](base.scheduler_config)
        scheduler.set_timesteps(first.steps, device=base.device)
        bank, request_slots = slots_for(base, requests, bank)

        seeds, slots, prompts, negatives, guidance = [], [], [], [], []
        for request, slot in zip(requests, request_slots, strict=True):
            for i in range(request.num_images):
                seeds.append(request.seed + i)
                slots.append(slot)
                prompts.append(request.prompt)
                negatives.append(request.negative_prompt)
                guidance.append(request.guidance_scale)
        shape = (
            base.latent_channels,
            first.height // base.vae_scale_factor,
            first.width // base.vae_scale_factor,
        )
        # One CPU generator per image: the same seed gives the same image in any batch.
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        latents = torch.stack(noise).to(base.device) * scheduler.init_noise_sigma
        inputs = self.loop_inputs(base, negatives, prompts, (first.height, first.width))
        scale = torch.tensor(guidance, device=base.device).view(-1, 1, 1, 1)
        # Routes are worked out on the host (no synchronisation per step), where a batch whose
        # samples share one adapter gets a uniform route, the layers' fast path.
        route_slots, route_timesteps = slots + slots, scheduler.timesteps.tolist()
        unet = base.unet
        for step, t in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            with routed(unet, bank.route(route_timesteps[step], route_slots)):
                uncond, cond = unet(model_input, t, **inputs).sample.chunk(2)
            prediction = uncond + scale * (cond - uncond)
            latents = scheduler.step(prediction, t, latents).prev_sample
            if on_step is not None:
                on_step(step + 1, len(scheduler.timesteps))
        decoded = base.vae.decode(latents / base.vae.config.scaling_factor).sample
        images = iter(zip(to_pil(decoded.float()), seeds, strict=True))
        return [
            [
                GeneratedImage(image, seed)
                for image, seed in (next(images) for _ in range(r.num_images))
            ]
            for r in requests
        ]


SD = UNetFamily()
