"""LoRA on the quantized base (QLoRA's arrangement), the baseline the benchmarks compare
TuneQDM with on the same quantized weights: the base stays frozen and quantized, and each of its
linear layers gains a low-rank update, ``y = Wq·x + (alpha/r)·B·A·x``.

As peft and diffusers' DreamBooth LoRA scripts start it: ``A`` Kaiming-uniform (``a = √5``, the
``nn.Linear`` initialisation), ``B`` zero (so training starts from the base), ``alpha = r``.
Every ``QuantLinear`` of the denoiser gets one (the layers TuneQDM trains scales of, convolutions
aside), so both methods adapt the same layers. The update runs as forward hooks, only inside
:meth:`LoRA.applied`, so the shared base is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from tuneqdm_core.layers import QuantLinear


class LoRA(torch.nn.Module):
    """One ``(A, B)`` pair per ``QuantLinear`` of ``model``, by the layer's name."""

    def __init__(self, model: torch.nn.Module, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.rank = rank
        self.names: list[str] = []
        self.down = torch.nn.ParameterList()
        self.up = torch.nn.ParameterList()
        for name, module in model.named_modules():
            if not isinstance(module, QuantLinear):
                continue
            bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform_(a=√5)'s bound
            down = (torch.rand(rank, module.in_features, generator=generator) * 2 - 1) * bound
            self.names.append(name)
            self.down.append(torch.nn.Parameter(down))
            self.up.append(torch.nn.Parameter(torch.zeros(module.out_features, rank)))
        if not self.names:
            raise ValueError("the model has no quantized linear layer to adapt")

    @property
    def scale(self) -> float:
        return 1.0  # alpha / rank with alpha = rank

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The pairs in PEFT's keys, ``{prefix}.{layer}.lora_A/lora_B.weight`` (``prefix`` the
        pipeline component, "unet" or "transformer"), as diffusers' ``load_lora_weights`` reads
        them: the float model with this LoRA, as QLoRA adapters are used (alpha = rank is PEFT's
        reading of a file without alphas)."""
        out = {}
        for name, down, up in zip(self.names, self.down, self.up, strict=True):
            out[f"{prefix}.{name}.lora_A.weight"] = down.detach().cpu().contiguous()
            out[f"{prefix}.{name}.lora_B.weight"] = up.detach().cpu().contiguous()
        return out

    def num_bytes(self) -> int:
        """What the adapter weighs stored in float32 (its file's tensors)."""
        return 4 * sum(p.numel() for p in self.parameters())

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """Within the block, ``model``'s layers add their low-rank updates."""
        modules = dict(model.named_modules())
        handles = []
        for name, down, up in zip(self.names, self.down, self.up, strict=True):

            def hook(
                _module: torch.nn.Module,
                args: tuple[torch.Tensor, ...],
                output: torch.Tensor,
                down: torch.Tensor = down,
                up: torch.Tensor = up,
            ) -> torch.Tensor:
                x = args[0]
                update = F.linear(F.linear(x.to(down.dtype), down.to(x.device)), up.to(x.device))
                return output + self.scale * update.to(output.dtype)

            handles.append(modules[name].register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
