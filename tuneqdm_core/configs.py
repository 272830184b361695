"""UNet2DConditionModel configs: the public SD 1.x / 2.x / SDXL architectures and tiny
versions of each shape for tests (diffusers' own test sizes)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel

_SD_COMMON: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd1": {
        **_SD_COMMON,
        "sample_size": 64,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    # stabilityai/stable-diffusion-2-1 unet/config.json
    "sd2": {
        **_SD_COMMON,
        "sample_size": 96,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
    },
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sdxl": {
        **_SD_COMMON,
        "sample_size": 128,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048,
        "attention_head_dim": (5, 10, 20),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "tiny-sd1": {
        **_SD_COMMON,
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
    },
    "tiny-sd2": {
        **_SD_COMMON,
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
    },
    "tiny-sdxl": {
        **_SD_COMMON,
        "sample_size": 16,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "cross_attention_dim": 32,
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        # pooled text embedding (32) + 6 time ids × addition_time_embed_dim (8)
        "projection_class_embeddings_input_dim": 80,
    },
}

# The built-in pretrained model (tuneqdm_core/builtin/pretrain.py): tiny-sd1's shape, twice as wide.
UNET_CONFIGS["fashion-sd"] = {
    **UNET_CONFIGS["tiny-sd1"],
    "block_out_channels": (64, 128),
    "cross_attention_dim": 64,
}


def build_unet(arch: str, seed: int = 0) -> UNet2DConditionModel:
    """A UNet of a named architecture with random weights (PyTorch's default init)."""
    if arch not in UNET_CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; choose from {sorted(UNET_CONFIGS)}")
    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIGS[arch])


def example_inputs(
    unet: UNet2DConditionModel, batch: int, timesteps: torch.Tensor, latent: int | None = None
) -> dict[str, Any]:
    """Keyword arguments for one forward of ``unet`` (random latents and text states)."""
    config = unet.config
    size = latent or config.sample_size
    kwargs: dict[str, Any] = {
        "sample": torch.randn(batch, config.in_channels, size, size),
        "timestep": timesteps,
        "encoder_hidden_states": torch.randn(batch, 7, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_dim),
            "time_ids": torch.randn(batch, 6),
        }
    return kwargs
