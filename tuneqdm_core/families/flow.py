"""What the flow-matching transformer families (FLUX, SD3) share.

Training follows diffusers' DreamBooth scripts for these models: a latent ``x`` (the VAE's,
shifted and scaled by its ``shift_factor``/``scaling_factor``), noise ``n``, a sigma drawn
from the family's density over the training scheduler's sigmas, the noisy input
``(1 − σ)·x + σ·n`` and the target ``n − x`` (the velocity), with a plain MSE (their loss
weighting is 1 for the densities used here).

**TAS on the sigma axis.** A flow model's noise level is its sigma ``σ ∈ [0, 1]``; its
schedulers shift it (SD3 by 3.0, FLUX by a shift that grows with the image's token count), so
the timestep *index* of a step says little. An adapter of ``n`` intervals uses interval
``⌊σ·n⌋`` (``n − 1`` at ``σ = 1``), read from the timestep the transformer is called with,
in training and in generation alike (:meth:`FlowFamily.tas_timesteps` maps it onto the
adapter's ``[0, T)`` axis so routes and banks need no change). Interval 0 holds the fine
detail (low noise), the last one the layout.

**The T5 encoder** (4.7 B parameters in FLUX.1 and SD3.5, 19 GB in fp32 — more than a W4
transformer) is frozen and only encodes prompts; ``text_encoder_bits=8`` stores its linear
layers as 8-bit codes with their per-channel scales (no adapter scales: nothing trains it),
quantized on the CPU before the pipeline moves to its device, so the float encoder never
occupies the device (:func:`quantize_text_encoder`).

Generation runs the family's own diffusers pipeline with the quantized transformer: a forward
pre-hook on the transformer (:class:`RowRouter`) gives each batch row its request's adapter
slot and its timestep's interval, including the classifier-free-guidance rows SD3 doubles.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)

from tuneqdm_core.cancel import cancel_checks
from tuneqdm_core.families.base import Family
from tuneqdm_core.layers import QuantLinear
from tuneqdm_core.model import QuantConfig, StorageMode, quantize_, set_storage_mode
from tuneqdm_core.routing import ScaleBank, set_route

if TYPE_CHECKING:
    from tuneqdm_core.base import BaseModel, Conditioning
    from tuneqdm_core.generate import GeneratedImage, GenerationRequest
    from tuneqdm_core.training_data import TrainingData
    from tuneqdm_core.training_step import Batch

# A sigma moved up by this much before ⌊σ·n⌋: the pipelines compute the transformer's
# timestep in float32 (FLUX divides t = 1000·σ by 1000 again), which may land a hair below
# the sigma training used; the nudge keeps both sides of an interval boundary the same.
SIGMA_TOLERANCE = 1e-6

SCHEDULERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "euler": lambda config: FlowMatchEulerDiscreteScheduler.from_config(config),
    "heun": lambda config: FlowMatchHeunDiscreteScheduler.from_config(config),
    # DPM-Solver++ on the flow sigmas, shifted as the family's own scheduler shifts them.
    "dpmsolver++": lambda config: DPMSolverMultistepScheduler.from_config(
        config,
        algorithm_type="dpmsolver++",
        use_flow_sigmas=True,
        flow_shift=config.get("shift", 1.0),
        prediction_type="flow_prediction",
    ),
}
# The model_index.json key of the side (pixels) a model was trained at, where its configs do
# not say it (FLUX pipelines assume 1024 px; the built-in models/fashion-flux is 32 px). The
# service reads it as the base's native resolution (app/bases.py restates it, without torch).
NATIVE_RESOLUTION_KEY = "_native_resolution"
# GenerationRequest's default name ("ddim", a UNet scheduler) means the family's default.
DEFAULT_SCHEDULER = "euler"
UNET_DEFAULT = "ddim"


@dataclass(frozen=True)
class Density:
    """diffusers' ``compute_density_for_timestep_sampling``: ``none`` (uniform u),
    ``logit_normal`` (σ(N(mean, std))) or ``mode`` (with ``mode_scale``)."""

    scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def cdf(self, u: torch.Tensor) -> torch.Tensor:
        """P(draw < u) for ``u`` in [0, 1] (float64)."""
        u = u.double()
        if self.scheme == "logit_normal":
            z = (torch.logit(u) - self.logit_mean) / self.logit_std
            return 0.5 * (1 + torch.erf(z / math.sqrt(2)))
        if self.scheme == "mode":  # no closed form: a fixed sample of a million draws
            draws = self.draw(1 << 20, torch.Generator().manual_seed(0)).double()
            return torch.searchsorted(draws.sort().values, u).double() / draws.numel()
        return u

    def draw(self, count: int, generator: torch.Generator) -> torch.Tensor:
        if self.scheme == "logit_normal":
            u = torch.normal(self.logit_mean, self.logit_std, (count,), generator=generator)
            return torch.sigmoid(u)
        u = torch.rand((count,), generator=generator)
        if self.scheme == "mode":
            return 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u


TEXT_ENCODER_BITS = (8,)


def quantize_text_encoder(encoder: torch.nn.Module, bits: int) -> None:
    """Store a frozen text encoder's ``nn.Linear`` layers as ``bits``-bit codes with
    per-channel min-max scales (no adapter scales: it is never trained). Embeddings and norms
    stay float. Every forward pass dequantizes each layer once (docs/library.md measures what
    that costs against what it saves)."""
    if bits not in TEXT_ENCODER_BITS:
        raise ValueError(f"text_encoder_bits must be one of {TEXT_ENCODER_BITS}, got {bits}")
    quantize_(
        encoder,
        QuantConfig(bits=bits, range="minmax"),  # type: ignore[arg-type]
        filter_fn=lambda module, _: isinstance(module, torch.nn.Linear),
    )
    for module in encoder.modules():
        if isinstance(module, QuantLinear):
            # transformers' T5 feed-forward casts its input to `wo.weight.dtype` where that is a
            # tensor; a quantized layer has no float weight and casts its input itself.
            setattr(module, "weight", None)  # noqa: B010 - not a Parameter


class FlowFamily(Family):
    """A flow-matching transformer family; subclasses say what differs (module docstring)."""

    name = ""
    denoiser = "transformer"
    pipeline_names: tuple[str, ...] = ()
    density = Density()
    # Components of the diffusers pipeline besides the transformer.
    text_parts: tuple[str, ...] = ()
    # The schedulers of SCHEDULERS the family's pipeline runs (FLUX's sets custom sigmas
    # and a shift per call, which only the flow-matching Euler scheduler takes).
    schedulers: tuple[str, ...] = tuple(SCHEDULERS)
    # The pipeline component holding the T5 encoder (text_encoder_bits quantizes it).
    t5_part = ""

    def pipeline_class(self) -> Any:
        raise NotImplementedError

    def transformer_class(self) -> Any:
        raise NotImplementedError

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
        """The float pipeline from a folder or hub id, its transformer quantized (every
        ``nn.Linear``; the patch embedding's conv too), the VAE and text encoders frozen.
        ``cache``: the quantized transformer's cache entry (read when complete, else written;
        a cached transformer is never loaded in float). ``text_encoder_bits``: 8 stores the
        T5 encoder's linear layers as 8-bit codes (None: float). ``config``: ``source`` is one
        transformer checkpoint file (:mod:`.single_file`) and ``config`` the diffusers folder
        or hub id the rest of the pipeline and the transformer's config come from."""
        from tuneqdm_core.base import (
            BaseModel,
            load_quantized_unet,
            pipeline_index,
            save_quantized_unet,
        )
        from tuneqdm_core.families.single_file import load_transformer_file

        start = time.perf_counter()
        from_cache = cache is not None and (cache / "meta.json").is_file()
        options: dict[str, Any] = {"dtype": torch.float32}
        if cache is not None and from_cache:
            options["transformer"] = load_quantized_unet(cache, device)
        elif config is not None:
            options["transformer"] = load_transformer_file(self, source, config)
        pipeline = self.pipeline_class().from_pretrained(config or source, **options)
        # model_index.json as written, keys diffusers ignores included (NATIVE_RESOLUTION_KEY,
        # a FLUX model's guidance).
        index = pipeline_index(config or source)
        if text_encoder_bits is not None:
            quantize_text_encoder(getattr(pipeline, self.t5_part), text_encoder_bits)
        pipeline.to(device)
        transformer = pipeline.transformer
        if not from_cache:
            quantize_(transformer, quant)
            if cache is not None:
                save_quantized_unet(transformer, cache, source)
        transformer.eval()
        set_storage_mode(transformer, storage_mode)
        for part in ("vae", *self.text_parts):
            module = getattr(pipeline, part, None)
            if module is not None and hasattr(module, "requires_grad_"):
                module.eval()
                module.requires_grad_(False)
        return BaseModel(
            source=source,
            guidance=self.guidance(index, pipeline),
            unet=transformer,
            vae=pipeline.vae,
            text_encoder=pipeline.text_encoder,
            tokenizer=pipeline.tokenizer,
            scheduler_config=dict(pipeline.scheduler.config),
            quant=quant,
            device=device,
            load_seconds=time.perf_counter() - start,
            from_cache=from_cache,
            extra={"pipeline": pipeline, "index": index},
            text_encoder_2=pipeline.text_encoder_2,
            tokenizer_2=pipeline.tokenizer_2,
            text_encoder_3=getattr(pipeline, "text_encoder_3", None),
            tokenizer_3=getattr(pipeline, "tokenizer_3", None),
            family=self,
        )

    # --- conditioning --------------------------------------------------------------------

    def encode(self, base: BaseModel, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    @staticmethod
    def _tokens(tokenizer: Any, prompts: list[str], max_length: int) -> torch.Tensor:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @staticmethod
    def pooled(conditioning: Conditioning) -> torch.Tensor:
        """The pooled embedding every transformer family conditions on."""
        if conditioning.pooled is None:
            raise ValueError("a transformer family's conditioning needs pooled embeddings")
        return conditioning.pooled

    # --- noise axis and intervals --------------------------------------------------------

    def sigma_of(self, model_timestep: torch.Tensor) -> torch.Tensor:
        """The sigma of the timestep argument the pipeline passes the transformer."""
        raise NotImplementedError

    def model_timestep(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The transformer's timestep argument for ``sigmas`` (inverse of :meth:`sigma_of`)."""
        raise NotImplementedError

    @staticmethod
    def tas_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> list[float]:
        """Sigmas on an adapter's ``[0, T)`` timestep axis, so that the adapter's interval
        ``⌊t·n/T⌋`` is ``⌊σ·n⌋`` (``n − 1`` at ``σ = 1``) for every ``n ≤ T``."""
        total = num_train_timesteps
        values = sigmas.detach().double().cpu().reshape(-1) + SIGMA_TOLERANCE
        return [min(max(float(s) * total, 0.0), total - 1.0) for s in values]

    # --- training ------------------------------------------------------------------------

    def float_denoiser(self, base: BaseModel) -> Any:
        return self.load_float(base.source).to(base.device)

    def training_scheduler(self, base: BaseModel) -> Any:
        """The scheduler training reads its sigmas from (as the DreamBooth scripts do)."""
        return FlowMatchEulerDiscreteScheduler.from_config(base.scheduler_config)

    def draw_sigmas(self, count: int, generator: torch.Generator, scheduler: Any) -> torch.Tensor:
        """``count`` training sigmas: u from the density, the scheduler's sigma at ⌊u·T⌋."""
        u = self.density.draw(count, generator)
        total = int(scheduler.config.num_train_timesteps)
        indices = (u * total).long().clamp(0, total - 1)
        return scheduler.sigmas[indices].to(torch.float64)

    def draw_timesteps(
        self, count: int, generator: torch.Generator, scheduler: Any
    ) -> torch.Tensor:
        return self.draw_sigmas(count, generator, scheduler)

    def interval_shares(self, base: BaseModel, intervals: int) -> list[float]:
        """The share of training draws in each of ``intervals`` intervals (exact, from the
        density's CDF over the training scheduler's sigmas): the weights of an export's
        ``"mean"`` interval, as uniform timesteps give the UNet families theirs."""
        scheduler = self.training_scheduler(base)
        total = int(scheduler.config.num_train_timesteps)
        edges = self.density.cdf(torch.arange(total + 1, dtype=torch.float64) / total)
        mass = edges[1:] - edges[:-1]  # P(index = i)
        sigmas = scheduler.sigmas[:total].double()
        tas = torch.tensor(self.tas_timesteps(sigmas, total), dtype=torch.float64)
        k = torch.floor(tas * intervals / total).long().clamp(0, intervals - 1)
        shares = torch.zeros(intervals, dtype=torch.float64).index_add_(0, k, mass)
        return [float(x) for x in shares / shares.sum()]

    # --- exports -------------------------------------------------------------------------

    lora_prefix = "transformer"  # the pipeline component load_lora_weights puts it in

    def load_float(self, source: str, config: str | None = None) -> Any:
        """The float transformer of a model folder or hub id (what exports start from), or of
        one transformer checkpoint file read with ``config`` (as :meth:`load` reads it)."""
        if config and Path(source).is_file():
            from tuneqdm_core.families.single_file import load_transformer_file

            return load_transformer_file(self, source, config)
        model = self.transformer_class().from_pretrained(
            source, subfolder="transformer", dtype=torch.float32
        )
        return model.eval()

    def latents(self, base: BaseModel, sample: torch.Tensor) -> torch.Tensor:
        config = base.vae.config
        shift = config.get("shift_factor") or 0.0
        return (sample - shift) * config.scaling_factor

    def noised(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noisy input, target) of flow matching."""
        sigma = sigmas.to(latents.device, latents.dtype).view(-1, 1, 1, 1)
        return (1 - sigma) * latents + sigma * noise, noise - latents

    def flow_inputs(
        self, base: BaseModel, data: TrainingData, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        """(noisy latents, target, conditioning) of a batch drawn with the family's schedule
        (``batch.timesteps`` are sigmas)."""
        from tuneqdm_core.base import Conditioning

        device = base.device
        sample = data.mean[batch.rows] + data.std[batch.rows] * batch.latent_noise.to(device)
        latents = self.latents(base, sample)
        noisy, target = self.noised(latents, batch.noise.to(device), batch.timesteps)
        conditioning = Conditioning(data.embeds, data.pooled)[data.prompt_of[batch.rows]]
        return noisy, target, conditioning

    def training_inputs(
        self, base: BaseModel, data: TrainingData, batch: Batch, scheduler: Any
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        noisy, target, conditioning = self.flow_inputs(base, data, batch)
        inputs = {
            "sigmas": batch.timesteps,
            "states": conditioning.states,
            "pooled": self.pooled(conditioning),
        }
        return noisy, target, inputs

    def denoise(
        self, base: BaseModel, model: Any, noisy: torch.Tensor, inputs: dict[str, Any]
    ) -> torch.Tensor:
        from tuneqdm_core.base import Conditioning

        conditioning = Conditioning(inputs["states"], inputs["pooled"])
        return self.predict(base, model, noisy, inputs["sigmas"], conditioning)

    def predict(
        self,
        base: BaseModel,
        model: Any,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: Conditioning,
    ) -> torch.Tensor:
        """The transformer's velocity for ``noisy`` latents ``[B, C, h, w]``, same layout."""
        raise NotImplementedError

    # --- generation ----------------------------------------------------------------------

    def check_request(self, base: BaseModel, request: GenerationRequest) -> None:
        factor = base.vae_scale_factor * self.size_multiple
        if request.scheduler not in (*self.schedulers, UNET_DEFAULT):
            raise ValueError(
                f"scheduler {request.scheduler!r} unknown for {self.name}; choose from "
                f"{sorted(self.schedulers)}"
            )
        if (
            request.width % factor
            or request.height % factor
            or min(request.width, request.height) < factor
        ):
            raise ValueError(
                f"width and height must be multiples of {factor}, got "
                f"{request.width}x{request.height}"
            )
        if request.num_images < 1 or request.steps < 1:
            raise ValueError("num_images and steps must be at least 1")

    size_multiple = 1  # on top of the VAE's factor: FLUX packs 2×2 latents, SD3 patches 2×2

    def guidance(self, index: dict[str, Any], pipeline: Any) -> str:
        """How the loaded ``pipeline`` with model_index.json ``index`` is guided (the values of
        ``BaseModel.guidance``); classifier-free unless the family says otherwise."""
        return "cfg"

    def guidance_call(self, base: BaseModel, scale: float) -> dict[str, Any]:
        """The pipeline call's guidance arguments for a request's ``guidance_scale``."""
        return {"guidance_scale": scale}

    def scheduler(self, base: BaseModel, name: str) -> Any:
        return SCHEDULERS[DEFAULT_SCHEDULER if name == UNET_DEFAULT else name](
            base.scheduler_config
        )

    def pipeline_call(
        self,
        base: BaseModel,
        requests: Sequence[GenerationRequest],
        rows: list[GenerationRequest],
    ) -> dict[str, Any]:
        """The conditioning keyword arguments of the pipeline call for ``rows`` (one per
        image): prompt embeddings computed here, once, by :meth:`encode`."""
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
        """Images for each request through the family's diffusers pipeline, requests grouped
        by steps, size, scheduler and guidance (what one pipeline call shares)."""
        from tuneqdm_core.generate import GeneratedImage, slots_for

        for request in requests:
            self.check_request(base, request)
        results: list[list[GeneratedImage]] = [[] for _ in requests]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault((*request.loop_key(), request.guidance_scale), []).append(index)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            bank, request_slots = slots_for(base, group, bank)
            rows, slots, seeds = [], [], []
            for request, slot in zip(group, request_slots, strict=True):
                for i in range(request.num_images):
                    rows.append(request)
                    slots.append(slot)
                    seeds.append(request.seed + i)
            first = group[0]
            pipeline = self.pipeline_class()(
                **{
                    **base.extra["pipeline"].components,
                    "scheduler": self.scheduler(base, first.scheduler),
                }
            )
            pipeline.set_progress_bar_config(disable=True)

            def step_end(
                _pipe: Any, step: int, _t: Any, _kwargs: Any, total: int = first.steps
            ) -> dict[str, Any]:
                if on_step is not None:
                    on_step(step + 1, total)
                return {}

            autocast = (
                torch.autocast(base.device.type, dtype=dtype)
                if dtype is not None
                else nullcontext()
            )
            with (
                autocast,
                cancel_checks(base.unet, should_cancel),
                routing_rows(base, bank, slots),
            ):
                images = pipeline(
                    **self.pipeline_call(base, group, rows),
                    num_inference_steps=first.steps,
                    height=first.height,
                    width=first.width,
                    **self.guidance_call(base, first.guidance_scale),
                    generator=[torch.Generator().manual_seed(s) for s in seeds],
                    callback_on_step_end=step_end,
                    output_type="pil",
                ).images
            made = iter(zip(images, seeds, strict=True))
            for i, request in zip(indices, group, strict=True):
                results[i] = [GeneratedImage(*next(made)) for _ in range(request.num_images)]
        return results


class RowRouter:
    """A forward pre-hook on the transformer: each call's route gives batch row ``b`` the
    slot of its image (``slots``, one per image; a batch of ``k × images`` rows — CFG's
    doubled batch — repeats them) at the interval of its own timestep."""

    def __init__(self, base: BaseModel, bank: ScaleBank, slots: Sequence[int]) -> None:
        self.base, self.bank, self.slots = base, bank, list(slots)

    def before(self, model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is None:
            raise ValueError("the transformer was called without hidden_states")
        batch = int(hidden.shape[0])
        if batch % len(self.slots):
            raise ValueError(f"a batch of {batch} rows for {len(self.slots)} images")
        slots = self.slots * (batch // len(self.slots))
        family = self.base.family
        sigma = family.sigma_of(torch.as_tensor(kwargs["timestep"]).reshape(-1))
        tas = family.tas_timesteps(sigma.expand(batch), self.bank.num_train_timesteps)
        set_route(model, self.bank.route(tas, slots))

    def after(self, model: Any, _args: Any, _kwargs: Any, _output: Any) -> None:
        set_route(model, None)


@contextmanager
def routing_rows(base: BaseModel, bank: ScaleBank, slots: Sequence[int]) -> Iterator[RowRouter]:
    """Within the block, every transformer call is routed by a :class:`RowRouter`."""
    router = RowRouter(base, bank, slots)
    model = base.unet
    handles = [
        model.register_forward_pre_hook(router.before, with_kwargs=True),
        model.register_forward_hook(router.after, with_kwargs=True),
    ]
    try:
        yield router
    finally:
        for handle in handles:
            handle.remove()
        set_route(model, None)
