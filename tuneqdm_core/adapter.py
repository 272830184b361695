"""Scale adapters: per timestep interval, ``s_out`` (and for TuneQDM ``s_in``) of every layer.

An adapter of ``n`` intervals holds ``n`` separate Parameters for ``s_out`` (each of length
Σ out-channels) and, for ``tuneqdm``, ``n`` for ``s_in`` (Σ in-channels). Separate tensors per
interval are what keeps an optimizer step from touching intervals that no sample of the batch
used: their ``.grad`` stays ``None`` and AdamW skips them (momentum and weight decay included),
which one tensor holding all intervals could not do: its one AdamW state would keep moving the
unused intervals through momentum and weight decay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tuneqdm_core.model import Layout, quant_state

Method = Literal["tuneqdm", "peqa"]
METHODS: tuple[str, ...] = ("tuneqdm", "peqa")


@dataclass(frozen=True)
class AdapterConfig:
    """``tuneqdm``: MCSU (``s_out`` + ``s_in``) with TAS over ``intervals`` timestep intervals
    (paper default 2). ``peqa``: ``s_out`` only, one interval (the paper's baseline).
    ``init_sigma`` > 0 draws the initial ``s_in`` from N(1, σ) (paper: σ = 0.01); the default
    0 starts exactly at the base model."""

    method: Method = "tuneqdm"
    intervals: int = 2
    init_sigma: float = 0.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "peqa" and self.intervals != 1:
            raise ValueError(f"peqa uses one interval, got intervals={self.intervals}")
        if not 1 <= self.intervals <= self.num_train_timesteps:
            raise ValueError(
                f"intervals must be in [1, {self.num_train_timesteps}], got {self.intervals}"
            )
        if self.init_sigma < 0:
            raise ValueError(f"init_sigma must be >= 0, got {self.init_sigma}")

    @property
    def has_s_in(self) -> bool:
        return self.method == "tuneqdm"

    def boundaries(self) -> list[tuple[int, int]]:
        """Timestep ranges ``[start, end)`` of the intervals: interval k holds the t with
        ``⌊t·n/T⌋ = k`` (TAS, docs/method.md)."""
        n, total = self.intervals, self.num_train_timesteps
        starts = [math.ceil(k * total / n) for k in range(n)] + [total]
        return [(starts[k], starts[k + 1]) for k in range(n)]

    def interval_of(self, timestep: float) -> int:
        if not 0 <= timestep < self.num_train_timesteps:
            raise ValueError(f"timestep {timestep} is outside [0, {self.num_train_timesteps})")
        return int(timestep * self.intervals // self.num_train_timesteps)


class Adapter(nn.Module):
    """The trainable (or loaded) scales of one subject for one quantized base."""

    def __init__(
        self,
        config: AdapterConfig,
        layout: Layout,
        s_out: list[torch.Tensor],
        s_in: list[torch.Tensor] | None,
        base_fingerprint: str,
        bits: int,
    ) -> None:
        super().__init__()
        if len(s_out) != config.intervals or (s_in is not None and len(s_in) != config.intervals):
            raise ValueError(f"expected {config.intervals} interval(s) of scales")
        if (s_in is not None) != config.has_s_in:
            raise ValueError(
                f"method {config.method!r} {'needs' if config.has_s_in else 'has no'} s_in"
            )
        self.config = config
        self.layout = layout
        self.base_fingerprint = base_fingerprint
        self.bits = bits
        self.s_out = nn.ParameterList([nn.Parameter(t) for t in s_out])
        self.s_in = nn.ParameterList([nn.Parameter(t) for t in s_in or []])

    @classmethod
    def create(
        cls,
        model: nn.Module,
        config: AdapterConfig | None = None,
        generator: torch.Generator | None = None,
    ) -> Adapter:
        """A new adapter at the paper's initial values: ``s_out = s0``, ``s_in = 1``
        (or N(1, σ)), on the device of the model's quantized layers."""
        config = config or AdapterConfig()
        state = quant_state(model)
        s0 = state.base_scales()
        s_in = None
        if config.has_s_in:
            s_in = []
            for _ in range(config.intervals):
                # float32 next to half-precision s0, float64 next to float64 s0.
                dtype = torch.promote_types(s0.dtype, torch.float32)
                ones = torch.ones(state.layout.total_in, device=s0.device, dtype=dtype)
                if config.init_sigma > 0:
                    noise = torch.randn(ones.shape, generator=generator, device="cpu")
                    ones = ones + config.init_sigma * noise.to(s0.device)
                s_in.append(ones)
        s_out = [s0.clone() for _ in range(config.intervals)]
        return cls(config, state.layout, s_out, s_in, state.fingerprint, state.config.bits)

    @property
    def has_s_in(self) -> bool:
        return len(self.s_in) > 0

    def layer_scales(self, index: int, interval: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(s_out[O], s_in[I] or None)`` of layer ``index`` for one interval (views)."""
        spec = self.layout.layers[index]
        o = self.layout.out_offsets[index]
        s_out = self.s_out[interval][o : o + spec.out_channels]
        if not self.has_s_in:
            return s_out, None
        i = self.layout.in_offsets[index]
        return s_out, self.s_in[interval][i : i + spec.in_channels]

    def num_values(self) -> int:
        return sum(p.numel() for p in self.parameters())


def param_groups(
    adapter: Adapter, lr_s_out: float, lr_s_in: float, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with separate learning rates for ``s_out`` and ``s_in``.

    ``s_out`` lives on the scale of the weights (~1e-3) and ``s_in`` around 1, so one learning
    rate leaves one of them frozen in practice (docs/method.md). Scales are 1-D and get no weight
    decay by default (nanoGPT's rule).
    """
    groups: list[dict[str, Any]] = [
        {
            "params": list(adapter.s_out),
            "lr": lr_s_out,
            "weight_decay": weight_decay,
            "name": "s_out",
        }
    ]
    if adapter.has_s_in:
        groups.append(
            {
                "params": list(adapter.s_in),
                "lr": lr_s_in,
                "weight_decay": weight_decay,
                "name": "s_in",
            }
        )
    return groups
