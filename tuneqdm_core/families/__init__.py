"""Model families: what differs between the diffusion models the library serves.

Everything the method needs is family-blind: quantized linear layers with per-channel scales
(:mod:`tuneqdm_core.model`), adapters and their files, routes and scale banks, optimizer groups,
checkpoints, co-training and cancel checks. A family module holds only what differs:

- **loading** a model folder or hub id into a :class:`~tuneqdm_core.base.BaseModel` with its
  denoiser (UNet or transformer) quantized;
- **text conditioning** (which encoders, which hidden states, pooled embeddings);
- **latent layout** (FLUX packs 2×2 latent patches into tokens with position ids);
- the **training target and timestep density** (ε/v-prediction on DDPM timesteps, or flow
  matching: target ``noise − latents`` at a sigma drawn from the family's density);
- the **schedulers** generation offers, run through the family's own diffusers pipeline;
- how a model call's **timestep maps to a TAS interval** on the family's own noise axis.

The UNet families (SD 1.x/2.x and SDXL) predate this package: their code stays in
:mod:`tuneqdm_core.base`, :mod:`tuneqdm_core.training_step` and :mod:`tuneqdm_core.generate`
(``BaseModel.family`` is ``None`` for them), which keeps their results bit for bit as they
were. The flow-matching transformers (:mod:`.flux`, :mod:`.sd3`) are families here.
"""

from __future__ import annotations

from typing import Any

from tuneqdm_core.families.flow import FlowFamily
from tuneqdm_core.families.flux import FLUX
from tuneqdm_core.families.sd3 import SD3_FAMILY as SD3

FAMILIES: dict[str, FlowFamily] = {family.name: family for family in (FLUX, SD3)}


def family_of_index(index: dict[str, Any]) -> FlowFamily | None:
    """The family of a diffusers ``model_index.json`` (None: a UNet pipeline)."""
    name = str(index.get("_class_name", ""))
    return next((f for f in FAMILIES.values() if name in f.pipeline_names), None)


__all__ = ["FAMILIES", "FlowFamily", "family_of_index"]
