"""Model families: what differs between the diffusion models the library serves.

Everything the method needs is family-blind: quantized linear layers with per-channel scales
(:mod:`tuneqdm_core.model`), adapters and their files, routes and scale banks, optimizer groups,
checkpoints, co-training and cancel checks. A family module holds only what differs:

- **loading** a model folder, hub id or single checkpoint file into a
  :class:`~tuneqdm_core.base.BaseModel` with its denoiser (UNet or transformer) quantized;
- **text conditioning** (which encoders, which hidden states, pooled embeddings);
- **latent layout** (FLUX packs 2×2 latent patches into tokens with position ids);
- the **training target and timestep density** (ε/v-prediction on DDPM timesteps, or flow
  matching: target ``noise − latents`` at a sigma drawn from the family's density);
- the **denoising call** (SDXL's added conditioning, a transformer's own arguments);
- the **schedulers** generation offers and its loop (the UNet families' own
  classifier-free-guidance loop, a transformer family's diffusers pipeline);
- how a model call's **timestep maps to a TAS interval** on the family's own noise axis.

:class:`~tuneqdm_core.families.base.Family` is the interface the core calls
(``BaseModel.family`` is always one): :mod:`.sd` (SD 1.x/2.x) and :mod:`.sdxl` for the UNets,
:mod:`.flow` (what the flow-matching transformers share) with :mod:`.flux` and :mod:`.sd3`.
"""

from __future__ import annotations

from typing import Any

from tuneqdm_core.families.base import Family
from tuneqdm_core.families.flow import FlowFamily
from tuneqdm_core.families.flux import FLUX
from tuneqdm_core.families.sd import SD, UNetFamily
from tuneqdm_core.families.sd3 import SD3_FAMILY as SD3
from tuneqdm_core.families.sdxl import SDXL

# The transformer families, found by their pipeline's class name (family_of_index).
FAMILIES: dict[str, FlowFamily] = {family.name: family for family in (FLUX, SD3)}


def family_of_index(index: dict[str, Any]) -> FlowFamily | None:
    """The transformer family of a diffusers ``model_index.json`` (None: a UNet pipeline,
    SD or SDXL, which :func:`tuneqdm_core.base.family_of_source` tells apart)."""
    name = str(index.get("_class_name", ""))
    return next((f for f in FAMILIES.values() if name in f.pipeline_names), None)


__all__ = [
    "FAMILIES",
    "SD",
    "SDXL",
    "Family",
    "FlowFamily",
    "UNetFamily",
    "family_of_index",
]
