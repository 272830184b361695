"""The built-in tiny Stable Diffusion pipeline, made offline from scratch.

No pretrained weights can be downloaded here, so tests and the embedded service mode use a
complete SD 1.x-shaped pipeline built from config: UNet, VAE, CLIP text encoder, a CLIP BPE
tokenizer whose vocab/merges are written locally, and a DDIM scheduler with SD's betas. It is
saved with ``save_pretrained`` and loads back through :func:`tuneqdm_core.base.load_base`
exactly like a real model folder. ``arch="tiny-sdxl"`` builds the SDXL layout instead: two text
encoders (the second with a projection), two tokenizers and a UNet with SDXL's added
conditioning.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from tuneqdm_core.configs import UNET_CONFIGS

# Words the tiny tokenizer knows as single tokens; anything else falls back to characters
# (every byte has a token, so no text maps to the unknown token).
WORDS = tuple(
    " ".join(
        [
            "a an the photo picture of in on at with and by sks zwx qrt dog cat bag shoe shirt",
            "dress coat boot sneaker sandal trouser pullover toy car red green blue yellow black",
            "white purple orange gray pink background top bottom left right center beach forest",
            "city snow style painting drawing",
        ]
    ).split(" ")
)

SPECIAL = ("<|startoftext|>", "<|endoftext|>")
TINY_ARCHS = ("tiny-sd1", "tiny-sd2", "sd1", "sd2", "tiny-sdxl")
XL_ARCHS = ("tiny-sdxl",)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-character table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def tokenizer_files(
    words: Sequence[str] = WORDS,
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of a CLIP BPE tokenizer: all 256 byte symbols, alone and as word
    ends (``</w>``), then one merge chain per word, then the special tokens."""
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            if merge not in merges:
                merges.append(merge)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for token in SPECIAL:
        vocab[token] = len(vocab)
    return vocab, merges


def text_config(vocab: dict[str, int], width: int, layers: int, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=vocab[SPECIAL[0]],
        eos_token_id=vocab[SPECIAL[1]],
        pad_token_id=vocab[SPECIAL[1]],
        **extra,
    )


def _vae_and_unet(
    unet_config: dict[str, Any], vae_channels: tuple[int, ...], resolution: int, **vae_extra: Any
) -> tuple[AutoencoderKL, UNet2DConditionModel]:
    """The VAE (one 2× downsampling per block after the first) and the UNet at its latent size,
    made in this order (the random initialisation depends on it)."""
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=unet_config["in_channels"],
        norm_num_groups=32,
        sample_size=resolution,
        **vae_extra,
    )
    factor = 2 ** (len(vae_channels) - 1)
    unet = UNet2DConditionModel(**{**unet_config, "sample_size": resolution // factor})
    return vae, unet


def build_pipeline(
    unet_config: dict[str, Any],
    *,
    seed: int = 0,
    resolution: int = 32,
    words: Sequence[str] = WORDS,
    text_layers: int = 2,
    vae_channels: tuple[int, ...] = (32, 64),
    prediction_type: str = "epsilon",
) -> StableDiffusionPipeline:
    """A randomly initialised SD 1.x-layout pipeline around ``unet_config``: a VAE with
    ``vae_channels`` (one 2× downsampling per extra block), a CLIP text encoder as wide as the
    UNet's cross-attention, the local tokenizer knowing ``words``, and SD's DDIM betas."""
    torch.manual_seed(seed)
    vocab, merges = tokenizer_files(words)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    text_encoder = CLIPTextModel(
        text_config(vocab, unet_config["cross_attention_dim"], text_layers)
    )
    vae, unet = _vae_and_unet(unet_config, vae_channels, resolution)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_xl_pipeline(
    unet_config: dict[str, Any],
    *,
    seed: int = 0,
    resolution: int = 32,
    words: Sequence[str] = WORDS,
    text_layers: int = 2,
    vae_channels: tuple[int, ...] = (32, 64),
) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-layout pipeline around ``unet_config`` (addition_embed_type
    "text_time"): two CLIP text encoders whose widths add up to the UNet's cross-attention
    (3:5, SDXL's 768 + 1280 of 2048), the second projecting its pooled output to what the
    UNet's added embedding takes beside the six time ids; both tokenizers local, the second
    padding with "!" as SDXL's does; the VAE with SDXL's latent scaling; Euler with SDXL's
    betas and configuration."""
    torch.manual_seed(seed)
    vocab, merges = tokenizer_files(words)
    cross = unet_config["cross_attention_dim"]
    pooled = (
        unet_config["projection_class_embeddings_input_dim"]
        - 6 * unet_config["addition_time_embed_dim"]
    )
    first = cross * 3 // 8
    text_encoder = CLIPTextModel(text_config(vocab, first, text_layers))
    text_encoder_2 = CLIPTextModelWithProjection(
        text_config(vocab, cross - first, text_layers, projection_dim=pooled)
    )
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer_2 = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="!")
    vae, unet = _vae_and_unet(unet_config, vae_channels, resolution, scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    # SDXL's scheduler_config.json carries these too; other schedulers made from it read them.
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def build_tiny_pipeline(
    seed: int = 0, resolution: int = 32, arch: str = "tiny-sd1"
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A complete, randomly initialised pipeline of SD 1.x shape (≈2 M parameters), of SD 2.x
    shape with ``arch="tiny-sd2"`` (linear attention projections, v-prediction), or of SDXL
    layout with ``arch="tiny-sdxl"``. ``arch="sd1"`` or ``"sd2"`` puts the real-size UNet
    architecture (random weights) beside the tiny VAE and text encoder, for measurements at full
    UNet scale."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {TINY_ARCHS}, got {arch!r}")
    if arch in XL_ARCHS:
        return build_xl_pipeline(UNET_CONFIGS[arch], seed=seed, resolution=resolution)
    return build_pipeline(
        UNET_CONFIGS[arch],
        seed=seed,
        resolution=resolution,
        prediction_type="v_prediction" if arch.endswith("sd2") else "epsilon",
    )


def save_pipeline(
    pipeline: StableDiffusionPipeline | StableDiffusionXLPipeline,
    directory: str | Path,
    words: Sequence[str] = WORDS,
) -> Path:
    """Write ``pipeline`` (built with ``words``) as a diffusers model folder."""
    directory = Path(directory)
    pipeline.save_pretrained(directory)
    # Keep the plain vocab/merges beside tokenizer.json: they are what CLIP folders ship.
    vocab, merges = tokenizer_files(words)
    for folder in ("tokenizer", "tokenizer_2"):
        if (directory / folder).is_dir():
            (directory / folder / "vocab.json").write_text(json.dumps(vocab))
            (directory / folder / "merges.txt").write_text(
                "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
            )
    return directory


def save_tiny_pipeline(
    directory: str | Path, seed: int = 0, resolution: int = 32, arch: str = "tiny-sd1"
) -> Path:
    """Build the tiny pipeline and write it as a diffusers model folder."""
    return save_pipeline(
        build_tiny_pipeline(seed=seed, resolution=resolution, arch=arch), directory
    )
