"""Quantizing a model in place, and the per-model state its quantized layers share."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from tuneqdm_core import quant
from tuneqdm_core.layers import QuantConv2d, QuantLayer, QuantLinear

if TYPE_CHECKING:
    from tuneqdm_core.routing import Route

# How a quantized model holds its frozen weights (set_storage_mode; docs/method.md):
# "packed": integer codes only, dequantized per layer on every forward and backward pass;
# "resident": the codes plus one dequantized copy of W0 per layer, read by every pass.
StorageMode = Literal["packed", "resident"]
STORAGE_MODES: tuple[StorageMode, ...] = ("packed", "resident")


@dataclass(frozen=True)
class QuantConfig:
    """How the base weights are quantized (docs/method.md).

    ``range="auto"`` searches the range per channel (``mse``) at 4 bits and takes min-max at
    8 bits: on bell-shaped and heavy-tailed weights the search gains 2–3.5 dB SQNR at 4 bits
    and under 0.1 dB at 8 bits (``python benchmarks/quant_range.py``; docs/method.md,
    "Quantization range"), so at 8 bits it would only cost time. ``grid``/``shrink``/``p`` tune
    the search.
    """

    bits: quant.Bits = 4
    range: Literal["auto", "minmax", "mse"] = "auto"
    grid: int = 24
    shrink: float = 0.5
    p: float = 2.0

    def __post_init__(self) -> None:
        quant.qmax(self.bits)
        if self.range not in ("auto", "minmax", "mse"):
            raise ValueError(f"range must be 'auto', 'minmax' or 'mse', got {self.range!r}")
        if self.grid < 1 or not 0.0 <= self.shrink < 1.0 or self.p <= 0:
            raise ValueError(
                f"need grid >= 1, 0 <= shrink < 1, p > 0; got grid={self.grid}, "
                f"shrink={self.shrink}, p={self.p}"
            )

    @property
    def range_method(self) -> quant.RangeMethod:
        if self.range == "auto":
            return "mse" if self.bits == 4 else "minmax"
        return self.range


@dataclass(frozen=True)
class LayerSpec:
    """What an adapter needs to know of one quantized layer."""

    name: str
    kind: str  # "linear" | "conv2d"
    out_channels: int
    in_channels: int


@dataclass(frozen=True)
class Layout:
    """The quantized layers of a model in a fixed order; scale vectors of all layers are
    concatenated in this order (``s_out`` of length Σ out, ``s_in`` of length Σ in)."""

    layers: tuple[LayerSpec, ...]

    @cached_property
    def out_sizes(self) -> list[int]:
        return [spec.out_channels for spec in self.layers]

    @cached_property
    def in_sizes(self) -> list[int]:
        return [spec.in_channels for spec in self.layers]

    @cached_property
    def out_offsets(self) -> list[int]:
        return _offsets(self.out_sizes)

    @cached_property
    def in_offsets(self) -> list[int]:
        return _offsets(self.in_sizes)

    @property
    def total_out(self) -> int:
        return sum(self.out_sizes)

    @property
    def total_in(self) -> int:
        return sum(self.in_sizes)


def _offsets(sizes: list[int]) -> list[int]:
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += size
    return offsets


class QuantState:
    """Shared by every quantized layer of one model: the layout, the active route, and the
    base fingerprint. A plain object (not a Module) so it never enters a state_dict."""

    def __init__(self, config: QuantConfig, layers: list[tuple[str, QuantLayer]]) -> None:
        self.config = config
        self.layers = layers
        kinds = {QuantLinear: "linear", QuantConv2d: "conv2d"}
        self.layout = Layout(
            tuple(
                LayerSpec(name, kinds[type(layer)], layer.out_channels, layer.in_channels)
                for name, layer in layers
            )
        )
        self.route: Route | None = None
        # Set with the route: the model recomputes layers in backward (gradient
        # checkpointing), so reads of the route are tracked (tuneqdm_core/routing.py).
        self.recomputes = False
        # Routes cleared while a graph that read them still awaited its backward.
        self.retired: list[Route] = []
        # The forward pre-hook that checks a route's timesteps against the call's, and, for
        # a model called with timesteps on another scale, the function of the call's
        # (args, kwargs) that gives them in training-timestep units (tuneqdm_core/routing.py).
        self.timestep_hook: Any = None
        self.call_timesteps: Callable[[tuple[Any, ...], dict[str, Any]], Any] | None = None
        self._fingerprint: str | None = None
        self.storage_mode: StorageMode = "packed"  # set_storage_mode()
        # Uniform routes (every sample reads one scale row) fold the scales into the weight
        # where that is cheaper (tuneqdm_core/layers.py); False forces the per-sample path
        # (benchmarks compare the two).
        self.uniform_fast_path = True
        self._scratch: dict[tuple[int, str, torch.dtype, torch.device], torch.Tensor] = {}

    def lookup(self, index: int, batch: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Layer ``index``'s scale rows from the active route (``None``: the plain base)."""
        in_backward = self.recomputes and torch._C._current_graph_task_id() != -1
        if in_backward and any(route.live_graphs for route in self.retired):
            raise RuntimeError(
                "gradient checkpointing is recomputing a quantized layer, but the route its "
                "forward read was cleared; run backward() inside `with routed(...)`"
            )
        if self.route is None:
            return None
        # The recomputation in backward builds a graph nobody backpropagates: not tracked.
        return self.route.lookup(index, batch, track=self.recomputes and not in_backward)

    def scratch(
        self, name: str, numel: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A reusable buffer of at least ``numel`` elements, one per thread, name, dtype and
        device (autograd runs CUDA backward on its own thread, so forward and backward never
        share one). Sized for the largest layer at first use, so it never regrows."""
        key = (threading.get_ident(), name, dtype, device)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            largest = max(
                layer.codes.numel() * (2 if layer.bits == 4 else 1) for _, layer in self.layers
            )
            buffer = torch.empty(max(numel, largest), dtype=dtype, device=device)
            self._scratch[key] = buffer
        return buffer[:numel]

    def base_scales(self) -> torch.Tensor:
        """All layers' ``s0`` concatenated in layout order (the initial ``s_out``)."""
        return torch.cat([layer.s0 for _, layer in self.layers])

    @property
    def fingerprint(self) -> str:
        """sha256 over layer names, shapes, bits, codes and per-channel parameters.

        Computed once (≈1 s for the SD 1.x UNet) and cached: the quantized base is frozen.
        """
        if self._fingerprint is None:
            self._fingerprint = self.compute_fingerprint()
        return self._fingerprint

    def compute_fingerprint(self) -> str:
        """:attr:`fingerprint` hashed afresh from the tensors (never cached)."""
        digest = hashlib.sha256()
        for name, layer in self.layers:
            digest.update(f"{name}:{layer.weight_shape}:{layer.bits};".encode())
            for tensor in (layer.codes, layer.s0, layer.zero):
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def restore_fingerprint(self, fingerprint: str) -> None:
        """Take the fingerprint saved with these same tensors (the quantized cache), instead
        of hashing them again when it is first asked for."""
        if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise ValueError(f"not a sha256 hex digest: {fingerprint!r}")
        self._fingerprint = fingerprint


def quant_state(model: nn.Module) -> QuantState:
    """The :class:`QuantState` of a model that went through :func:`quantize_`."""
    state = getattr(model, "tuneqdm_state", None)
    if not isinstance(state, QuantState):
        raise ValueError(
            f"{type(model).__name__} has no quantized layers; call tuneqdm_core.quantize_(model) "
            "first"
        )
    return state


def resident_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype of a resident copy: what the products run in by default on ``device`` (bf16
    on CUDA, fp16 where bf16 is unsupported; fp32 on a CPU, where autocast is off by default)."""
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def set_storage_mode(
    model: nn.Module, mode: StorageMode, dtype: torch.dtype | None = None
) -> QuantState:
    """Switch a quantized model between the ``packed`` and ``resident`` storage modes.

    ``resident`` dequantizes every layer's ``W0`` once into ``dtype`` (default
    :func:`resident_dtype` of the model's device) on the model's device; every forward and
    backward pass whose compute dtype is ``dtype`` reads that copy instead of dequantizing, and
    every adapter, job and route of the model shares it. The integer codes are kept (they are
    1/4 of an fp16 copy at 4 bits, 1/2 at 8): they are what the fingerprint, the quantized
    cache and adapters' checks read, and a pass at another dtype dequantizes from them exactly.
    Call it after moving the model to its device.
    """
    if mode not in STORAGE_MODES:
        raise ValueError(f"storage mode must be one of {STORAGE_MODES}, got {mode!r}")
    state = quant_state(model)
    for _, layer in state.layers:
        layer.resident = None  # the old copies go before new ones are made
    if mode == "resident":
        dtype = dtype or resident_dtype(state.layers[0][1].codes.device)
        with torch.no_grad():
            for _, layer in state.layers:
                layer.resident = layer.dequantize(dtype).detach()
    state.storage_mode = mode
    return state


def default_filter(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear | nn.Conv2d)


def quantize_(
    model: nn.Module,
    config: QuantConfig | None = None,
    filter_fn: Callable[[nn.Module, str], bool] = default_filter,
) -> QuantState:
    """Replace every ``nn.Linear`` / ``nn.Conv2d`` (as chosen by ``filter_fn``) in place with a
    frozen quantized layer, freeing each float weight as it goes, and freeze the rest.

    Returns the model's :class:`QuantState` (also reachable as ``quant_state(model)``).
    """
    config = config or QuantConfig()
    if hasattr(model, "tuneqdm_state"):
        raise ValueError("model is already quantized")
    options = {"grid": config.grid, "shrink": config.shrink, "p": config.p}
    # Names only: holding the float modules here would keep every float weight alive until
    # the end, doubling peak memory on a large UNet.
    targets = [name for name, m in model.named_modules() if name and filter_fn(m, name)]
    layers: list[tuple[str, QuantLayer]] = []
    for name in targets:
        module = model.get_submodule(name)
        quantized: QuantLayer
        if isinstance(module, nn.Conv2d):
            quantized = QuantConv2d(module, config.bits, config.range_method, **options)
        elif isinstance(module, nn.Linear):
            quantized = QuantLinear(module, config.bits, config.range_method, **options)
        else:
            raise TypeError(f"{name}: cannot quantize {type(module).__name__}")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantized)
        layers.append((name, quantized))
        del module
    if not layers:
        raise ValueError(f"no nn.Linear or nn.Conv2d layer of {type(model).__name__} was selected")
    model.requires_grad_(False)
    state = QuantState(config, layers)
    for index, (_, layer) in enumerate(layers):
        layer.index = index
        layer.state = state
    setattr(model, "tuneqdm_state", state)  # noqa: B010 - a plain attribute, not a submodule
    return state
