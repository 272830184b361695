"""Stable Diffusion 3 / 3.5: an MMDiT (joint text-image attention) trained by flow matching.

What differs from other families: conditioning joins two projecting CLIP encoders'
penultimate hidden states (concatenated, zero-padded to T5's width) with T5's states along the
sequence, and both CLIPs' pooled projections (as ``StableDiffusion3Pipeline.encode_prompt``
without clip skip); latents keep their ``[C, h, w]`` layout (the transformer patches them);
the scheduler shifts sigmas by 3.0, training draws them from that shifted schedule with
diffusers' ``train_dreambooth_sd3.py`` default density (logit-normal, mean 0, std 1); the
transformer's timestep is ``1000·σ``; classifier-free guidance doubles the batch (negative rows
first), the rows the router repeats the slots for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tuneqdm_core.families.flow import Density, FlowFamily

if TYPE_CHECKING:
    from tuneqdm_core.base import BaseModel, Conditioning
    from tuneqdm_core.generate import GenerationRequest

MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default
TIMESTEP_SCALE = 1000.0


class SD3(FlowFamily):
    name = "sd3"
    pipeline_names = ("StableDiffusion3Pipeline",)
    density = Density("logit_normal", logit_mean=0.0, logit_std=1.0)
    text_parts = ("text_encoder", "text_encoder_2", "text_encoder_3")
    t5_part = "text_encoder_3"
    size_multiple = 2

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def transformer_class(self) -> Any:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def encode(self, base: BaseModel, prompts: list[str]) -> Conditioning:
        from tuneqdm_core.base import Conditioning

        states, pooled = [], []
        for tokenizer, encoder in (
            (base.tokenizer, base.text_encoder),
            (base.tokenizer_2, base.text_encoder_2),
        ):
            tokens = self._tokens(tokenizer, prompts, tokenizer.model_max_length)
            out = encoder(tokens.to(encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        t5 = base.text_encoder_3
        if t5 is None:  # SD3 runs without T5: zeros in its place
            width = base.unet.config.joint_attention_dim
            t5_states = torch.zeros(len(prompts), MAX_SEQUENCE_LENGTH, width, device=clip.device)
        else:
            tokens = self._tokens(base.tokenizer_3, prompts, MAX_SEQUENCE_LENGTH)
            t5_states = t5(tokens.to(t5.device))[0]
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        joint = torch.cat([clip, t5_states.to(clip.device)], dim=-2)
        return Conditioning(joint.to(base.device), torch.cat(pooled, dim=-1).to(base.device))

    def sigma_of(self, model_timestep: torch.Tensor) -> torch.Tensor:
        return model_timestep.double() / TIMESTEP_SCALE

    def model_timestep(self, sigmas: torch.Tensor) -> torch.Tensor:
        return sigmas * TIMESTEP_SCALE

    def predict(
        self,
        base: BaseModel,
        model: Any,
        noisy: torch.Tensor,
        sigmas: torch.Tensor,
        conditioning: Conditioning,
    ) -> torch.Tensor:
        dtype = noisy.dtype
        return model(
            hidden_states=noisy,
            timestep=self.model_timestep(sigmas).to(noisy.device, dtype),
            encoder_hidden_states=conditioning.states.to(dtype),
            pooled_projections=self.pooled(conditioning).to(dtype),
            return_dict=False,
        )[0]

    def pipeline_call(
        self,
        base: BaseModel,
        requests: Sequence[GenerationRequest],
        rows: list[GenerationRequest],
    ) -> dict[str, Any]:
        texts = list(
            dict.fromkeys([r.prompt for r in requests] + [r.negative_prompt for r in requests])
        )
        conditioning = self.encode(base, texts)
        positive = torch.tensor([texts.index(r.prompt) for r in rows])
        negative = torch.tensor([texts.index(r.negative_prompt) for r in rows])
        return {
            "prompt_embeds": conditioning.states[positive],
            "pooled_prompt_embeds": self.pooled(conditioning)[positive],
            "negative_prompt_embeds": conditioning.states[negative],
            "negative_pooled_prompt_embeds": self.pooled(conditioning)[negative],
            "max_sequence_length": MAX_SEQUENCE_LENGTH,
        }


SD3_FAMILY = SD3()
