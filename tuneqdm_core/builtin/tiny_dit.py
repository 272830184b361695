"""Tiny FLUX and SD3 pipelines (flow-matching transformers), made offline from scratch.

Like :mod:`tuneqdm_core.builtin.tiny`, every part is built from config with random weights:
the transformer, a VAE with FLUX's/SD3's latent shift and scale, every text encoder (CLIP,
and T5 with a tokenizer made with the ``tokenizers`` library: a Unigram model over the tiny
word list, Metaspace pre-tokenizer and a ``$A </s>`` template, as T5's own), and the
``FlowMatchEulerDiscreteScheduler`` each family ships with. The folders load with
``DiffusionPipeline.from_pretrained`` and :func:`tuneqdm_core.base.load_base`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from tuneqdm_core.builtin.tiny import WORDS, text_config, tokenizer_files

DIT_ARCHS = ("tiny-flux", "tiny-sd3")
T5_SPECIAL = ("<pad>", "</s>", "<unk>")


def t5_tokenizer(words: tuple[str, ...] = WORDS, max_length: int = 512) -> T5TokenizerFast:
    """A T5-style SentencePiece-like tokenizer: special tokens, each word with the ``▁``
    word-start mark, then single characters (so any ASCII text has pieces)."""
    pieces = [*T5_SPECIAL, *(f"▁{w}" for w in words), "▁"]
    chars = sorted({c for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"})
    pieces += chars + [f"▁{c}" for c in chars]
    pieces = list(dict.fromkeys(pieces))  # "▁a" is a word and a character
    vocab = [(p, 0.0 if p in T5_SPECIAL else -float(len(p) == 1) - 1.0) for p in pieces]
    model = models.Unigram(vocab, unk_id=T5_SPECIAL.index("<unk>"))
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    eos = T5_SPECIAL.index("</s>")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        extra_ids=0,
    )


def t5_encoder(width: int, vocab: int, layers: int = 2) -> T5EncoderModel:
    """A T5 encoder of ``layers`` layers of ``width`` (4 heads of 8, relative positions in 8
    buckets) over ``vocab`` ids (:func:`t5_tokenizer`'s)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=layers,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _vae(latent_channels: int, resolution: int, shift: float, scale: float) -> AutoencoderKL:
    channels = (32, 64)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=resolution,
        shift_factor=shift,
        scaling_factor=scale,
    )


def _clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = tokenizer_files(WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_tiny_flux(seed: int = 0, resolution: int = 32) -> FluxPipeline:
    """FLUX.1-dev's layout at toy size: a double-stream and a single-stream block, the guidance
    embedding, CLIP (pooled) + T5 (sequence) text encoders, 4 latent channels packed 2×2."""
    torch.manual_seed(seed)
    vocab, _ = tokenizer_files(WORDS)
    text_encoder = CLIPTextModel(text_config(vocab, 32, 2))
    t5_tok = t5_tokenizer()
    text_encoder_2 = t5_encoder(32, len(t5_tok))
    vae = _vae(4, resolution, shift=0.1159, scale=0.3611)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    # FLUX.1's scheduler: shift 3.0 with the resolution-dependent (dynamic) shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def build_tiny_sd3(seed: int = 0, resolution: int = 32) -> StableDiffusion3Pipeline:
    """SD3.5's layout at toy size: one joint (MMDiT) block, two projecting CLIP encoders and
    T5, 4 latent channels in 2×2 patches, the flow-matching scheduler with shift 3.0."""
    torch.manual_seed(seed)
    vocab, _ = tokenizer_files(WORDS)
    text_encoder = CLIPTextModelWithProjection(text_config(vocab, 16, 2, projection_dim=16))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(vocab, 16, 2, projection_dim=16))
    t5_tok = t5_tokenizer()
    text_encoder_3 = t5_encoder(32, len(t5_tok))
    vae = _vae(4, resolution, shift=0.0609, scale=1.5305)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer(
            vocab=vocab, merges=tokenizer_files(WORDS)[1], model_max_length=77, pad_token="!"
        ),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )


def save_tiny_dit(directory: str | Path, arch: str, seed: int = 0, resolution: int = 32) -> Path:
    """Build ``arch`` (``tiny-flux`` or ``tiny-sd3``) and write it as a diffusers folder."""
    builders: dict[str, Any] = {"tiny-flux": build_tiny_flux, "tiny-sd3": build_tiny_sd3}
    if arch not in builders:
        raise ValueError(f"arch must be one of {DIT_ARCHS}, got {arch!r}")
    directory = Path(directory)
    builders[arch](seed=seed, resolution=resolution).save_pretrained(directory)
    # The plain vocab/merges beside tokenizer.json, as CLIP folders ship them.
    vocab, merges = tokenizer_files(WORDS)
    for folder in {"tiny-flux": ("tokenizer",), "tiny-sd3": ("tokenizer", "tokenizer_2")}[arch]:
        (directory / folder / "vocab.json").write_text(json.dumps(vocab))
        (directory / folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        )
    return directory
