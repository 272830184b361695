"""A FLUX or SD3 transformer read from one checkpoint file (``.safetensors``/``.ckpt``).

FLUX.1 ships as one transformer file in Black Forest Labs' original layout (what ComfyUI
loads: ``double_blocks.0.img_attn.qkv.weight``, ``single_blocks.0.linear1.weight``,
``final_layer.adaLN_modulation.1.weight`` …), SD3/SD3.5 as one file in Stability's MMDiT layout
(``model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight`` …, sometimes with the text
encoders and the VAE in the same file). Such a file holds the transformer's weights only: its
config, the VAE, the text encoders, the tokenizers and the scheduler come from ``config``, a
diffusers folder or hub id of the same family. A transformer file in diffusers' own layout
(``transformer/diffusion_pytorch_model.safetensors``) reads the same way.

The family is told by the file's keys (``double_blocks.``: FLUX, ``joint_blocks.``: SD3) and by
the config's ``model_index.json``; a file of either layout without ``config`` is refused with
what to pass, and a file and config of different families are refused too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tuneqdm_core.families.flow import FlowFamily

# The prefix ComfyUI-style and Stability all-in-one files put before the transformer's keys.
ORIGINAL_PREFIX = "model.diffusion_model."
# A key prefix only each family's original-layout transformer has.
FAMILY_KEYS = {"flux": "double_blocks.", "sd3": "joint_blocks."}
# A key prefix a transformer in diffusers' layout has (both families).
DIFFUSERS_KEY = "transformer_blocks."

# FLUX.1, original → diffusers module names. A tuple: the original tensor is the
# concatenation of these along dim 0 (q, k, v; single blocks: q, k, v, then the MLP's input).
_FLUX_TOP: dict[str, str] = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",  # (shift, scale) → (scale, shift)
}
_FLUX_DOUBLE: dict[str, str | tuple[str, ...]] = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_FLUX_SINGLE: dict[str, str | tuple[str, ...]] = {
    "modulation.lin": "norm.linear",
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
    "linear2": "proj_out",
}
_FLUX_ROOTS = {
    *(name.split(".")[0] for name in _FLUX_TOP),
    "double_blocks",
    "single_blocks",
}


def checkpoint_keys(path: str | os.PathLike[str]) -> list[str]:
    """A checkpoint file's tensor names (a ``.safetensors`` header only; a ``.ckpt`` memory-mapped,
    its ``state_dict`` if nested)."""
    if str(path).lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return list(state)


def _family_of_keys(keys: list[str]) -> FlowFamily | None:
    from tuneqdm_core.families import FAMILIES

    for name, prefix in FAMILY_KEYS.items():
        if any(k.startswith((prefix, ORIGINAL_PREFIX + prefix)) for k in keys):
            return FAMILIES[name]
    return None


def family_of_file(path: str, config: str | None) -> FlowFamily | None:
    """The transformer family of the checkpoint file ``path`` read with ``config`` (None: a UNet
    checkpoint); raises ValueError when the file needs a config it was not given, or when the
    file and the config are of different families."""
    from tuneqdm_core.base import pipeline_index
    from tuneqdm_core.families import family_of_index

    keys = checkpoint_keys(path)
    by_keys = _family_of_keys(keys)
    if not config:
        if by_keys is None:
            return None
        raise ValueError(
            f"{path} is a {by_keys.name} transformer checkpoint: it holds the transformer only, "
            f"so it needs a config — a diffusers {by_keys.name} folder or hub id for the VAE, "
            "text encoders, tokenizers, scheduler and the transformer's config (load_base(..., "
            "config=FOLDER), the CLI's --config FOLDER, or TUNEQDM_SINGLE_FILE_CONFIG=FOLDER)"
        )
    by_index = family_of_index(pipeline_index(config))
    if by_index is None:
        if by_keys is not None:
            raise ValueError(
                f"{path} is a {by_keys.name} transformer checkpoint but config {config!r} is not "
                f"a {by_keys.name} pipeline; pass a diffusers {by_keys.name} folder or hub id"
            )
        return None
    if by_keys is not None and by_keys is not by_index:
        raise ValueError(
            f"{path} is a {by_keys.name} transformer checkpoint but config {config!r} is a "
            f"{by_index.name} pipeline; pass a diffusers {by_keys.name} folder or hub id"
        )
    if by_keys is None and not any(k.startswith(DIFFUSERS_KEY) for k in keys):
        raise ValueError(
            f"{path} holds no {by_index.name} transformer (no {FAMILY_KEYS[by_index.name]!r} "
            f"keys of the original layout nor {DIFFUSERS_KEY!r} keys of diffusers' layout)"
        )
    return by_index


def _split(tensor: torch.Tensor, names: tuple[str, ...], inner: int) -> list[torch.Tensor]:
    """The parts of a concatenated projection: q, k, v of ``inner`` rows each, then the rest."""
    sizes = [inner] * 3 + [tensor.shape[0] - 3 * inner] * (len(names) - 3)
    if sum(sizes) != tensor.shape[0] or min(sizes) <= 0:
        raise ValueError(f"a fused projection of {tensor.shape[0]} rows for width {inner}")
    return list(torch.split(tensor, sizes, dim=0))


def flux_to_diffusers(
    checkpoint: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, Any]:
    """A FLUX.1 transformer's state dict in Black Forest Labs' layout → diffusers' layout (as
    diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``, with the widths from the
    transformer's ``config`` instead of FLUX.1's fixed 3072). Keys outside the transformer
    (a bundled VAE or text encoder) are left out; a transformer key of no known name raises."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    out: dict[str, Any] = {}
    for key, tensor in checkpoint.items():
        name = key.removeprefix(ORIGINAL_PREFIX)
        if name.split(".")[0] not in _FLUX_ROOTS:
            continue
        module, param = name.rsplit(".", 1)
        param = "weight" if param == "scale" else param  # RMSNorm's scale
        block, _, rest = module.partition(".")
        index, _, part = rest.partition(".")
        target: str | tuple[str, ...] | None
        if block in ("double_blocks", "single_blocks"):
            table = _FLUX_DOUBLE if block == "double_blocks" else _FLUX_SINGLE
            prefix = (
                "transformer_blocks" if block == "double_blocks" else "single_transformer_blocks"
            )
            target = table.get(part)
            if isinstance(target, str):
                target = f"{prefix}.{index}.{target}"
            elif target is not None:
                target = tuple(f"{prefix}.{index}.{t}" for t in target)
        else:
            target = _FLUX_TOP.get(module)
        if target is None:
            raise ValueError(f"unknown FLUX transformer key {key!r}")
        if isinstance(target, tuple):
            for t, piece in zip(target, _split(tensor, target, inner), strict=True):
                out[f"{t}.{param}"] = piece
        elif module == "final_layer.adaLN_modulation.1":
            shift, scale = tensor.chunk(2, dim=0)
            out[f"{target}.{param}"] = torch.cat([scale, shift], dim=0)
        else:
            out[f"{target}.{param}"] = tensor
    return out


def load_transformer_file(family: FlowFamily, path: str, config: str) -> Any:
    """The float32 transformer of ``family`` in the checkpoint file ``path``, its config from
    ``config``'s ``transformer`` folder (a local folder never reaches the hub)."""
    local = Path(config).is_dir()
    model_class = family.transformer_class()
    if family.name != "flux":
        # diffusers' SD3 converter reads every width from the tensors themselves.
        model = model_class.from_single_file(
            path,
            config=config,
            subfolder="transformer",
            local_files_only=local,
            dtype=torch.float32,
        )
        return model.eval()
    # diffusers' FLUX converter splits the single blocks' fused projection at FLUX.1's fixed
    # width (3072); this one takes the width from the config, so any size reads.
    from diffusers.loaders.single_file_utils import load_single_file_checkpoint

    model_config = model_class.load_config(config, subfolder="transformer", local_files_only=local)
    checkpoint = load_single_file_checkpoint(path, local_files_only=True)
    if any(
        k.startswith((FAMILY_KEYS["flux"], ORIGINAL_PREFIX + FAMILY_KEYS["flux"]))
        for k in checkpoint
    ):
        checkpoint = flux_to_diffusers(checkpoint, model_config)
    with torch.device("meta"):
        model = model_class.from_config(model_config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in checkpoint]
    if missing:
        raise ValueError(f"{path}: the {family.name} transformer lacks {missing[:5]}")
    # Popped one by one: each tensor of the file is freed once its float32 copy is made.
    state = {k: checkpoint.pop(k).to(torch.float32).contiguous() for k in expected}
    del checkpoint
    model.load_state_dict(state, assign=True)
    return model.eval()
