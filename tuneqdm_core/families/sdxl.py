"""Stable Diffusion XL: the SD UNet family with two text encoders and added conditioning.

What differs from SD 1.x/2.x (docs/library.md "SDXL"): the UNet cross-attends to the
penultimate hidden states of both CLIP encoders, concatenated, and takes
``added_cond_kwargs``: the pooled, projected embedding of the second encoder and six "time
ids" (original size, crop corner, target size; :func:`~tuneqdm_core.base.time_ids`).
Generation conditions on an uncropped image at the requested size, for the prompt and the
negative prompt alike; an empty negative prompt is all-zero conditioning where the model asks
for it (``force_zeros_for_empty_prompt``), as diffusers' SDXL pipeline does. A single
checkpoint file loads through ``StableDiffusionXLPipeline.from_single_file``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from tuneqdm_core.base import BaseModel, Conditioning, pipeline_index, time_ids
from tuneqdm_core.families.sd import UNetFamily


class SDXLFamily(UNetFamily):
    name = "sdxl"

    def single_file_pipeline(self, source: str, options: dict[str, Any]) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline.from_single_file(source, **options)

    def more_encoders(self, source: str, device: torch.device) -> tuple[Any, Any, bool]:
        encoder = CLIPTextModelWithProjection.from_pretrained(
            source, subfolder="text_encoder_2"
        ).to(device)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
        # The SDXL pipeline's default is True; SD 1.x/2.x pipelines have no such option.
        zero_empty = bool(pipeline_index(source).get("force_zeros_for_empty_prompt", True))
        return encoder, tokenizer, zero_empty

    def encode(self, base: BaseModel, prompts: list[str]) -> Conditioning:
        """Both encoders' penultimate hidden states concatenated, and the second encoder's
        pooled projection (as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` without
        clip skip)."""
        states = []
        pooled = torch.empty(0)
        for tokenizer, encoder in (
            (base.tokenizer, base.text_encoder),
            (base.tokenizer_2, base.text_encoder_2),
        ):
            output = self._run_encoder(base, tokenizer, encoder, prompts, hidden_states=True)
            states.append(output.hidden_states[-2])
            pooled = output[0]  # text_embeds of the projecting second encoder
        return Conditioning(torch.cat(states, dim=-1).to(base.device), pooled.to(base.device))

    def unet_inputs(
        self, base: BaseModel, conditioning: Conditioning, time_ids: torch.Tensor | None = None
    ) -> dict[str, Any]:
        """The text states and ``added_cond_kwargs`` (pooled text and ``time_ids``
        ``[N, 6]``)."""
        inputs = super().unet_inputs(base, conditioning)
        if conditioning.pooled is None or time_ids is None:
            raise ValueError("an SDXL UNet needs pooled text embeddings and time ids")
        # At least float32: bf16 keeps 8 significant bits and would round sizes like 3023.
        dtype = torch.promote_types(conditioning.states.dtype, torch.float32)
        inputs["added_cond_kwargs"] = {
            "text_embeds": conditioning.pooled,
            "time_ids": time_ids.to(conditioning.states.device, dtype),
        }
        return inputs

    def loop_inputs(
        self,
        base: BaseModel,
        negatives: list[str],
        prompts: list[str],
        size: tuple[int, int],
    ) -> dict[str, Any]:
        conditioning = base.encode(negatives + prompts)
        if base.zero_empty_negative:
            empty = [n == "" for n in negatives] + [False] * len(prompts)
            conditioning = conditioning.zeroed(torch.tensor(empty))
        ids = torch.tensor([time_ids(size, (0, 0), size)] * (2 * len(prompts)))
        return self.unet_inputs(base, conditioning, ids)


SDXL = SDXLFamily()
