"""FLUX.1 ([dev]/[schnell]): a flow-matching transformer of double- and single-stream blocks.

What differs from other families: conditioning is T5's last hidden states (the sequence the
transformer attends to, padded to ``max_sequence_length``) and CLIP's pooled output (as
``FluxPipeline.encode_prompt``); latents are 2×2 patches packed into tokens, with (0, row,
column) position ids for the image and zeros for the text; the schedulers shift sigmas by an
amount that grows with the token count (``use_dynamic_shifting``), while training draws
unshifted sigmas uniformly (diffusers' ``train_dreambooth_flux.py`` defaults, weighting
``none``); a guidance-distilled model ([dev]) takes the guidance scale as an embedding, trained
at ``TRAIN_GUIDANCE``; it has no negative prompt.

A FLUX-family model trained for classifier-free guidance instead (the built-in
``models/fashion-flux``; "de-distilled" FLUX.1 variants) says so in its ``model_index.json``
(``GUIDANCE_KEY``: ``"cfg"``; diffusers ignores keys that start with ``_``). Its guidance scale is
then ``FluxPipeline``'s ``true_cfg_scale`` against the negative prompt (empty by default), a
second, unconditioned pass per step, with the guidance embedding (where it has one) held at
``TRAIN_GUIDANCE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tuneqdm_core.families.flow import Density, FlowFamily

if TYPE_CHECKING:
    from tuneqdm_core.base import BaseModel, Conditioning
    from tuneqdm_core.generate import GenerationRequest

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default


def sequence_length(tokenizer_2: Any) -> int:
    """T5's padded prompt length: FluxPipeline's 512, or less where the T5 tokenizer says so
    (FLUX.1's says 512; the built-in models/fashion-flux 32, the length it was trained at)."""
    return min(MAX_SEQUENCE_LENGTH, int(getattr(tokenizer_2, "model_max_length", 512)))


TRAIN_GUIDANCE = 1.0
# The model_index.json key of a FLUX model guided classifier-free (app/families.py reads it
# too, without torch; tests/worker/test_families.py checks the two agree).
GUIDANCE_KEY = "_guidance"


def guidance_of(index: dict[str, Any], transformer: dict[str, Any]) -> str:
    """How a FLUX model is guided, from its model_index.json and transformer config:
    ``cfg`` (classifier-free, where the index says so), ``embedded`` (a distilled guidance
    embedding, [dev]) or ``none`` ([schnell])."""
    if index.get(GUIDANCE_KEY) == "cfg":
        return "cfg"
    return "embedded" if transformer.get("guidance_embeds") else "none"


def pack(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h/2 · w/2, 4C]`` (FluxPipeline._pack_latents)."""
    b, c, h, w = latents.shape
    packed = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return packed.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for latents of ``height`` × ``width``."""
    b, _, channels = tokens.shape
    grid = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Position ids ``[h·w, 3]`` of the packed tokens of a ``height`` × ``width`` token grid."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device, dtype)


class Flux(FlowFamily):
    name = "flux"
    pipeline_names = ("FluxPipeline",)
    density = Density("none")
    text_parts = ("text_encoder", "text_encoder_2")
    t5_part = "text_encoder_2"
    size_multiple = 2
    schedulers = ("euler",)

    def pipeline_class(self) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline

    def transformer_class(self) -> Any:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def encode(self, base: BaseModel, prompts: list[str]) -> Conditioning:
        from tuneqdm_core.base import Conditioning

        clip, t5 = base.text_encoder, base.text_encoder_2
        tokens = self._tokens(base.tokenizer, prompts, base.tokenizer.model_max_length)
        pooled = clip(tokens.to(clip.device), output_hidden_states=False).pooler_output
        tokens = self._tokens(base.tokenizer_2, prompts, sequence_length(base.tokenizer_2))
        states = t5(tokens.to(t5.device), output_hidden_states=False)[0]
        return Conditioning(states.to(base.device), pooled.to(base.device))

    def guidance(self, index: dict[str, Any], pipeline: Any) -> str:
        return guidance_of(index, dict(pipeline.transformer.config))

    def guidance_call(self, base: BaseModel, scale: float) -> dict[str, Any]:
        if base.guidance == "cfg":
            return {"true_cfg_scale": scale, "guidance_scale": TRAIN_GUIDANCE}
        return {"guidance_scale": scale}

    def sigma_of(self, model_timestep: torch.Tensor) -> torch.Tensor:
        return model_timestep  # FluxPipeline passes t / 1000 = σ

    def model_timestep(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas

    def predict(
        self,
        base: BaseModel,
        model: Any,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: Conditioning,
    ) -> torch.Tensor:
        batch, _, height, width = noisy.shape
        dtype, device = noisy.dtype, noisy.device
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((batch,), TRAIN_GUIDANCE, device=device, dtype=dtype)
        out = model(
            hidden_states=pack(noisy),
            timestep=self.model_timestep(sigmas).to(device, dtype),
            guidance=guidance,
            pooled_projections=self.pooled(conditioning).to(dtype),
            encoder_hidden_states=conditioning.states.to(dtype),
            txt_ids=torch.zeros(conditioning.states.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids(height // 2, width // 2, device, dtype),
            return_dict=False,
        )[0]
        return unpack(out, height, width)

    def pipeline_call(
        self,
        base: BaseModel,
        requests: Sequence[GenerationRequest],
        rows: list[GenerationRequest],
    ) -> dict[str, Any]:
        cfg = base.guidance == "cfg"
        if not cfg and any(r.negative_prompt for r in requests):
            raise ValueError("this FLUX model takes no negative prompt (its guidance is not CFG)")
        texts = [r.prompt for r in requests]
        if cfg:
            texts += [r.negative_prompt for r in requests]
        texts = list(dict.fromkeys(texts))
        conditioning = self.encode(base, texts)
        which = torch.tensor([texts.index(r.prompt) for r in rows])
        call = {
            "prompt_embeds": conditioning.states[which],
            "pooled_prompt_embeds": self.pooled(conditioning)[which],
            "max_sequence_length": sequence_length(base.tokenizer_2),
        }
        if cfg:
            negative = torch.tensor([texts.index(r.negative_prompt) for r in rows])
            call["negative_prompt_embeds"] = conditioning.states[negative]
            call["negative_pooled_prompt_embeds"] = self.pooled(conditioning)[negative]
        return call


FLUX = Flux()
