"""FLUX and SD3 transformers for the training benchmark: a few blocks at the real width.

The full FLUX.1 transformer (11.9 B parameters) does not fit a 24 GiB CPU machine in fp32, and
building it in float only to quantize it would take most of a run. The benchmark therefore
builds a *subset* of the architecture at the real width (``SUBSET_BLOCKS``: FLUX.1's first
double-stream and first single-stream block, SD3.5-large's first two joint blocks, with every
embedding and output layer) and extrapolates to the full depth pro rata by parameters: the full
model's parameter count comes from the same config built on the ``meta`` device (no memory).

Configs: FLUX.1-dev's transformer (hidden 3072 = 24 heads × 128, 19 double + 38 single blocks,
joint_attention_dim 4096, pooled 768, in_channels 64, guidance embedding) and SD3.5-large's
(hidden 2432 = 38 heads × 64, 38 joint blocks, joint_attention_dim 4096, pooled 2048,
in_channels 16, patch 2, RMS qk-norm). ``tiny-flux``/``tiny-sd3`` are the same layouts at toy
width, for the smoke test.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

from tuneqdm_core import QuantConfig, quantize_

FLUX = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
SD3 = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",
}
TINY_FLUX = FLUX | {
    "in_channels": 16,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 4, 8),
}
TINY_SD3 = SD3 | {
    "in_channels": 4,
    "out_channels": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 32,
    "pooled_projection_dim": 32,
    "pos_embed_max_size": 32,
}
CONFIGS: dict[str, dict[str, Any]] = {
    "flux": FLUX,
    "sd3": SD3,
    "tiny-flux": TINY_FLUX,
    "tiny-sd3": TINY_SD3,
}
# Blocks built and measured: FLUX's (double, single), SD3's (joint,).
SUBSET_BLOCKS = {"flux": (1, 1), "sd3": (2,)}
# The layers diffusers' DreamBooth LoRA scripts train by default (train_dreambooth_lora_flux.py,
# train_dreambooth_lora_sd3.py): attention projections, plus FLUX's feed-forwards.
LORA_TARGETS = {
    "flux": [
        "attn.to_k",
        "attn.to_q",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ],
    "sd3": [
        "attn.add_k_proj",
        "attn.add_q_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.to_k",
        "attn.to_out.0",
        "attn.to_q",
        "attn.to_v",
    ],
}
TEXT_TOKENS = 32


def family(arch: str) -> str:
    return arch.removeprefix("tiny-")


def _config(arch: str, full: bool) -> dict[str, Any]:
    config = dict(CONFIGS[arch])
    if full:
        return config
    if family(arch) == "flux":
        config["num_layers"], config["num_single_layers"] = SUBSET_BLOCKS["flux"]
    else:
        config["num_layers"] = SUBSET_BLOCKS["sd3"][0]
    return config


def _model_class(arch: str) -> Any:
    return FluxTransformer2DModel if family(arch) == "flux" else SD3Transformer2DModel


def build_subset(arch: str) -> torch.nn.Module:
    """The measured subset with random fp32 weights (module docstring)."""
    model: torch.nn.Module = _model_class(arch)(**_config(arch, full=False))
    return model


def build_quantized(
    arch: str, full_depth: bool, device: torch.device, dtype: torch.dtype, bits: int = 4
) -> torch.nn.Module:
    """The subset (or with ``full_depth`` the whole transformer) with random weights, quantized
    to ``bits``. The full depth is built on ``device`` in ``dtype`` (FLUX.1 in bf16: 24 GB, so
    a GPU's memory) and quantized there; ``quantize_`` frees each float weight as it replaces
    its layer, so the float model exists whole once, at load, and never during training. The
    layers left in float (norms, biases-free embeddings) are cast to fp32, as a loaded base's."""
    cls = _model_class(arch)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model: torch.nn.Module = cls(**_config(arch, full=full_depth))
    finally:
        torch.set_default_dtype(previous)
    # min-max ranges: the range search changes no byte or FLOP, only the load time.
    quantize_(model, QuantConfig(bits=bits, range="minmax"))  # type: ignore[arg-type]
    return model.float()


def blocks(model: Any) -> dict[str, list[torch.nn.Module]]:
    """The repeated blocks by kind."""
    if hasattr(model, "single_transformer_blocks"):
        return {
            "double": list(model.transformer_blocks),
            "single": list(model.single_transformer_blocks),
        }
    return {"joint": list(model.transformer_blocks)}


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(arch: str) -> dict[str, Any]:
    """Float parameters of the measured subset, of one block of each kind, and of the full
    model (built on the meta device: shapes only, no memory)."""
    with torch.device("meta"):
        full = _model_class(arch)(**_config(arch, full=True))
        subset = _model_class(arch)(**_config(arch, full=False))
    return {
        "subset": _numel(subset),
        "full": _numel(full),
        "blocks_subset": {kind: len(b) for kind, b in blocks(subset).items()},
        "blocks_full": {kind: len(b) for kind, b in blocks(full).items()},
        "per_block": {kind: _numel(b[0]) for kind, b in blocks(full).items()},
    }


def flow_inputs(
    model: Any,
    batch: int,
    side: int,
    generator: torch.Generator,
    device: torch.device,
    text_tokens: int = TEXT_TOKENS,
) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """One random flow-matching step's (transformer kwargs, target, sigmas) for a ``side`` ×
    ``side`` grid of latent tokens and ``text_tokens`` text tokens: the noisy input
    ``(1 − σ)·x + σ·n`` and the velocity target ``n − x`` (tuneqdm_core.families.flow)."""
    config = model.config
    sigmas = torch.rand((batch,), generator=generator, device=device)
    text = torch.randn(
        (batch, text_tokens, config.joint_attention_dim), generator=generator, device=device
    )
    pooled = torch.randn((batch, config.pooled_projection_dim), generator=generator, device=device)
    if "guidance_embeds" in config:  # FLUX: packed tokens, timestep = σ, guidance embedding
        shape: tuple[int, ...] = (batch, side * side, config.in_channels)
    else:  # SD3: a latent image of 2×2 patches, timestep = 1000·σ
        patch = config.patch_size
        shape = (batch, config.in_channels, side * patch, side * patch)
    latents = torch.randn(shape, generator=generator, device=device)
    noise = torch.randn(shape, generator=generator, device=device)
    sigma = sigmas.view(-1, *[1] * (len(shape) - 1))
    kwargs: dict[str, Any] = {
        "hidden_states": (1 - sigma) * latents + sigma * noise,
        "encoder_hidden_states": text,
        "pooled_projections": pooled,
        "return_dict": False,
    }
    if "guidance_embeds" in config:
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
        kwargs |= {
            "timestep": sigmas,
            "guidance": torch.full((batch,), 3.5, device=device),
            "img_ids": ids.to(device, torch.float32),
            "txt_ids": torch.zeros((text_tokens, 3), device=device),
        }
    else:
        kwargs["timestep"] = sigmas * 1000
    return kwargs, noise - latents, sigmas
