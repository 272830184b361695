"""The inverse of diffusers' FLUX and SD3 single-file converters: a diffusers transformer's
state dict in the original layouts (Black Forest Labs' ``flux1-dev.safetensors``, Stability's
MMDiT files), written from ``convert_flux_transformer_checkpoint_to_diffusers`` and
``convert_sd3_transformer_checkpoint_to_diffusers`` so that tests can make the files real
checkpoints come as from the tiny models."""

from __future__ import annotations

import torch

SD3_PREFIX = "model.diffusion_model."


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous takes (scale, shift), the original layouts (shift,
    scale): the same swap converts either way."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


class _Writer:
    """Takes diffusers keys once each and writes original ones; ``check`` fails on leftovers."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        self.left = set(state)
        self.out: dict[str, torch.Tensor] = {}

    def take(self, key: str) -> torch.Tensor:
        self.left.remove(key)
        return self.state[key]

    def put(self, original: str, *diffusers: str, swap: bool = False) -> None:
        for param in ("weight", "bias"):
            if f"{diffusers[0]}.{param}" in self.state:
                tensor = torch.cat([self.take(f"{d}.{param}") for d in diffusers], dim=0)
                self.out[f"{original}.{param}"] = _swap_halves(tensor) if swap else tensor

    def norm(self, original: str, diffusers: str, param: str) -> None:
        self.out[f"{original}.{param}"] = self.take(f"{diffusers}.weight")

    def check(self) -> dict[str, torch.Tensor]:
        assert not self.left, sorted(self.left)[:5]
        return {k: v.contiguous().clone() for k, v in self.out.items()}


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k.split(".")[1] for k in state if k.startswith(prefix)})


def flux_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict in Black Forest Labs' layout (flux1-dev.safetensors)."""
    w = _Writer(state)
    w.put("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    w.put("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    w.put("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    w.put("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    w.put("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
    w.put("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    w.put("txt_in", "context_embedder")
    w.put("img_in", "x_embedder")
    for i in range(_count(state, "transformer_blocks.")):
        o, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        w.put(o + "img_mod.lin", d + "norm1.linear")
        w.put(o + "txt_mod.lin", d + "norm1_context.linear")
        w.put(o + "img_attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        w.put(
            o + "txt_attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"
        )
        w.norm(o + "img_attn.norm.query_norm", d + "attn.norm_q", "scale")
        w.norm(o + "img_attn.norm.key_norm", d + "attn.norm_k", "scale")
        w.norm(o + "txt_attn.norm.query_norm", d + "attn.norm_added_q", "scale")
        w.norm(o + "txt_attn.norm.key_norm", d + "attn.norm_added_k", "scale")
        w.put(o + "img_mlp.0", d + "ff.net.0.proj")
        w.put(o + "img_mlp.2", d + "ff.net.2")
        w.put(o + "txt_mlp.0", d + "ff_context.net.0.proj")
        w.put(o + "txt_mlp.2", d + "ff_context.net.2")
        w.put(o + "img_attn.proj", d + "attn.to_out.0")
        w.put(o + "txt_attn.proj", d + "attn.to_add_out")
    for i in range(_count(state, "single_transformer_blocks.")):
        o, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        w.put(o + "modulation.lin", d + "norm.linear")
        w.put(o + "linear1", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")
        w.norm(o + "norm.query_norm", d + "attn.norm_q", "scale")
        w.norm(o + "norm.key_norm", d + "attn.norm_k", "scale")
        w.put(o + "linear2", d + "proj_out")
    w.put("final_layer.linear", "proj_out")
    w.put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return w.check()


def sd3_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An SD3Transformer2DModel state dict in Stability's MMDiT layout, keys under
    ``model.diffusion_model.`` as the SD3.5 single files have them."""
    w = _Writer(state)
    w.out["pos_embed"] = w.take("pos_embed.pos_embed")
    w.put("x_embedder.proj", "pos_embed.proj")
    w.put("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    w.put("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    w.put("context_embedder", "context_embedder")
    w.put("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")
    w.put("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2")
    layers = _count(state, "transformer_blocks.")
    for i in range(layers):
        o, d = f"joint_blocks.{i}.", f"transformer_blocks.{i}."
        last = i == layers - 1
        x, c = o + "x_block.", o + "context_block."
        w.put(x + "attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        w.put(c + "attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")
        if d + "attn.norm_q.weight" in state:
            w.norm(x + "attn.ln_q", d + "attn.norm_q", "weight")
            w.norm(x + "attn.ln_k", d + "attn.norm_k", "weight")
            w.norm(c + "attn.ln_q", d + "attn.norm_added_q", "weight")
            w.norm(c + "attn.ln_k", d + "attn.norm_added_k", "weight")
        w.put(x + "attn.proj", d + "attn.to_out.0")
        if not last:
            w.put(c + "attn.proj", d + "attn.to_add_out")
        if d + "attn2.to_q.weight" in state:
            w.put(x + "attn2.qkv", d + "attn2.to_q", d + "attn2.to_k", d + "attn2.to_v")
            if d + "attn2.norm_q.weight" in state:
                w.norm(x + "attn2.ln_q", d + "attn2.norm_q", "weight")
                w.norm(x + "attn2.ln_k", d + "attn2.norm_k", "weight")
            w.put(x + "attn2.proj", d + "attn2.to_out.0")
        w.put(x + "adaLN_modulation.1", d + "norm1.linear")
        w.put(c + "adaLN_modulation.1", d + "norm1_context.linear", swap=last)
        w.put(x + "mlp.fc1", d + "ff.net.0.proj")
        w.put(x + "mlp.fc2", d + "ff.net.2")
        if not last:
            w.put(c + "mlp.fc1", d + "ff_context.net.0.proj")
            w.put(c + "mlp.fc2", d + "ff_context.net.2")
    w.put("final_layer.linear", "proj_out")
    w.put("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return {SD3_PREFIX + k: v for k, v in w.check().items()}
