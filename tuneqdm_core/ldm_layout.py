"""A diffusers SD 1.x or SDXL pipeline in the original layout (CompVis/LDM, Stability's SDXL):
the key names of single-file checkpoints that A1111, ComfyUI and diffusers' ``from_single_file``
read, and the module names kohya-style SDXL LoRAs use.

The inverse of what diffusers' ``from_single_file`` converts, written for the block structure in
the pipeline's own config (any number of blocks and layers per block), not for SD 1.5's fixed
shape only. The merged-checkpoint export writes these keys; tests write the tiny pipelines'
single-file checkpoints with them.
"""

from __future__ import annotations

from typing import Any

import torch

_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)


def _unet_prefixes(config: Any) -> list[tuple[str, str]]:
    """``(diffusers prefix, LDM prefix)`` pairs of the UNet's blocks."""
    per_block = int(config.layers_per_block)
    down, up = config.down_block_types, config.up_block_types
    pairs: list[tuple[str, str]] = [
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),  # SDXL's pooled text + time ids
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
        ("mid_block.resnets.0.", "middle_block.0."),
        ("mid_block.resnets.1.", "middle_block.2."),
    ]
    for i, kind in enumerate(down):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{index}.0."))
            if kind.startswith("CrossAttn"):
                pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{index}.1."))
        if i < len(down) - 1:
            index = (i + 1) * (per_block + 1)
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{index}.0.op."))
    for i, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{index}.0."))
            if attention:
                pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{index}.1."))
        if i < len(up) - 1:
            index = i * (per_block + 1) + per_block
            pairs.append(
                (f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{index}.{2 if attention else 1}.")
            )
    return pairs


def _rename(key: str, prefixes: list[tuple[str, str]], resnet: bool) -> str:
    for hf, ldm in prefixes:
        if key.startswith(hf):
            rest = key[len(hf) :]
            if resnet and ".resnets." in hf:
                for a, b in _RESNET:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
            return ldm + rest
    return key


def ldm_module_name(name: str, config: Any) -> str:
    """The original-layout name of the UNet module ``name`` (diffusers' name)."""
    return _rename(name + ".", _unet_prefixes(config), True)[:-1]


def unet_to_ldm(unet: Any) -> dict[str, torch.Tensor]:
    prefixes = _unet_prefixes(unet.config)
    return {
        "model.diffusion_model." + _rename(k, prefixes, True): v
        for k, v in unet.state_dict().items()
    }


def vae_to_ldm(vae: Any) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    prefixes: list[tuple[str, str]] = [
        ("encoder.conv_norm_out.", "encoder.norm_out."),
        ("decoder.conv_norm_out.", "decoder.norm_out."),
    ]
    for side in ("encoder", "decoder"):
        for j in range(2):
            prefixes.append((f"{side}.mid_block.resnets.{j}.", f"{side}.mid.block_{j + 1}."))
        prefixes.append((f"{side}.mid_block.attentions.0.", f"{side}.mid.attn_1."))
    for i in range(blocks):
        for j in range(2):
            prefixes.append(
                (f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.")
            )
        prefixes.append(
            (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")
        )
        for j in range(3):
            prefixes.append(
                (f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{blocks - 1 - i}.block.{j}.")
            )
        prefixes.append(
            (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{blocks - 1 - i}.upsample.")
        )
    attention = {
        "group_norm": "norm",
        "to_q": "q",
        "to_k": "k",
        "to_v": "v",
        "to_out.0": "proj_out",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in vae.state_dict().items():
        name = _rename(key, prefixes, False).replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in name:
            head, _, tail = name.partition(".mid.attn_1.")
            part, _, kind = tail.rpartition(".")
            name = f"{head}.mid.attn_1.{attention[part]}.{kind}"
            if kind == "weight" and part != "group_norm":  # LDM's attention uses 1×1 convs
                value = value.reshape(*value.shape, 1, 1)
        out["first_stage_model." + name] = value
    return out


def pipeline_to_ldm(pipeline: Any) -> dict[str, torch.Tensor]:
    """One original-layout state dict for the UNet, the VAE and the CLIP text encoder."""
    # Original checkpoints nest CLIP under ``text_model.``; newer transformers versions
    # flatten ``CLIPTextModel``, so the prefix is added where the model lacks it.
    nested = "" if hasattr(pipeline.text_encoder, "text_model") else "text_model."
    text = {
        f"cond_stage_model.transformer.{nested}{k}": v
        for k, v in pipeline.text_encoder.state_dict().items()
    }
    merged = {**unet_to_ldm(pipeline.unet), **vae_to_ldm(pipeline.vae), **text}
    return {k: v.detach().contiguous().clone() for k, v in merged.items()}


def _text_model_keys(encoder: Any) -> dict[str, torch.Tensor]:
    """The encoder's state dict with CLIP's ``text_model.`` nesting (see pipeline_to_ldm)."""
    nested = "" if hasattr(encoder, "text_model") else "text_model."
    return {
        (k if k.startswith("text_projection") else nested + k): v
        for k, v in encoder.state_dict().items()
    }


def open_clip_from_hf(encoder: Any) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection in OpenCLIP's layout, as SDXL's second text encoder is
    stored (the inverse of diffusers' ``convert_open_clip_checkpoint``)."""
    state = _text_model_keys(encoder)
    renames = (
        ("text_model.encoder.layers.", "transformer.resblocks."),
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        (".fc1.", ".c_fc."),
        (".fc2.", ".c_proj."),
        (".self_attn.", ".attn."),
    )
    out = {
        "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": state["text_model.final_layer_norm.weight"],
        "ln_final.bias": state["text_model.final_layer_norm.bias"],
        "text_projection": state["text_projection.weight"].T,
    }
    for key, value in state.items():
        if not key.startswith("text_model.encoder.layers."):
            continue
        name = key
        for a, b in renames:
            name = name.replace(a, b)
        if ".q_proj." in key:  # OpenCLIP keeps q, k and v as one in_proj
            kind = key.rpartition(".")[2]
            parts = [state[key.replace(".q_proj.", f".{x}_proj.")] for x in "qkv"]
            out[name.replace(f".q_proj.{kind}", f".in_proj_{kind}")] = torch.cat(parts)
        elif ".k_proj." not in key and ".v_proj." not in key:
            out[name] = value
    return out


def xl_pipeline_to_ldm(pipeline: Any) -> dict[str, torch.Tensor]:
    """One SDXL-layout state dict: UNet, VAE, CLIP ViT-L under ``conditioner.embedders.0``
    and the OpenCLIP-layout second encoder under ``conditioner.embedders.1``."""
    first = {
        f"conditioner.embedders.0.transformer.{k}": v
        for k, v in _text_model_keys(pipeline.text_encoder).items()
    }
    second = {
        f"conditioner.embedders.1.model.{k}": v
        for k, v in open_clip_from_hf(pipeline.text_encoder_2).items()
    }
    merged = {**unet_to_ldm(pipeline.unet), **vae_to_ldm(pipeline.vae), **first, **second}
    return {k: v.detach().contiguous().clone() for k, v in merged.items()}
