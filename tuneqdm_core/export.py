"""Adapters that travel: an adapter as a LoRA file or merged into the float UNet.

An adapter acts on layer ``l`` of the quantized base as the weight (per interval ``k``)::

    Ŵ_k = s_out[k] ⊙ (q − z) ⊙ s_in[k]          shape [O, K] (K = I·kh·kw for a conv)

A float pipeline of the same model has the weights ``W`` the base was quantized from. Two
exports make that pipeline draw what the adapter draws on the quantized base:

- **merged**: ``W`` is replaced by ``Ŵ`` (the float UNet with the adapter written in);
- **LoRA**: ``W + B·A`` with ``B·A`` the best rank-``r`` approximation (truncated SVD) of
  ``D = Ŵ − W``, in the PEFT layout that diffusers' ``load_lora_weights`` reads.

``D`` is taken against the float ``W``, so it holds the adapter's change *and* the base's
quantization error ``dequant(q) − W``: at full rank the float pipeline then computes exactly
``Ŵ``, and at any rank the truncated SVD is the closest rank-``r`` weight to ``Ŵ`` (Eckart–Young).
``include_quantization_error=False`` takes ``D = Ŵ − dequant(q)`` instead: the adapter's change
alone on top of the float weights (the float base's precision kept, not the quantized images
reproduced). A LoRA has one weight per layer: ``interval`` picks which of the adapter's
timestep intervals, or ``"mean"`` (default): ``Σ_k w_k Ŵ_k`` with ``w_k`` the share of training
timesteps in interval ``k`` — the single weight closest on average (least squares) to the
interval weights over uniformly drawn timesteps, which is how training draws them.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from tuneqdm_core import quant
from tuneqdm_core.adapter import Adapter
from tuneqdm_core.layers import QuantConv2d, QuantLayer
from tuneqdm_core.model import quant_state

Interval = int | str  # an interval index, or "mean"
METADATA_KEY = "tuneqdm_export"
# A float UNet whose re-quantized codes differ from the base's in more than this share of
# weights is not the model the base was quantized from (a few codes may round the other way
# when the base was quantized on another device).
_MAX_CODE_MISMATCH = 1e-3


@dataclass
class LoraExport:
    """A LoRA ready to save: ``tensors`` keyed ``unet.{layer}.lora_A.weight`` /
    ``lora_B.weight`` and the numbers that go in the file's metadata."""

    tensors: dict[str, torch.Tensor]
    rank: int
    interval: Interval
    include_quantization_error: bool
    layer_errors: dict[str, float]
    error: float
    extra: dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> dict[str, Any]:
        return {
            "format": "peft-lora",
            "rank": self.rank,
            "interval": self.interval,
            "include_quantization_error": self.include_quantization_error,
            "relative_error": self.error,
            "layer_relative_errors": self.layer_errors,
            **self.extra,
        }


def interval_weights(
    adapter: Adapter, interval: Interval, shares: Sequence[float] | None = None
) -> list[float]:
    """Weight of each of the adapter's intervals in the exported weight: one-hot for an
    index, the share of the ``num_train_timesteps`` each interval covers for ``"mean"`` (or
    ``shares``: each interval's share of the training draws where they are not uniform, as
    a transformer family's density makes them; tuneqdm_core.families)."""
    n = adapter.config.intervals
    if interval == "mean" and shares is not None:
        if len(shares) != n:
            raise ValueError(f"{len(shares)} interval shares for a {n}-interval adapter")
        return [float(w) for w in shares]
    if interval == "mean":
        total = adapter.config.num_train_timesteps
        return [(end - start) / total for start, end in adapter.config.boundaries()]
    if isinstance(interval, str) or not 0 <= interval < n:
        raise ValueError(
            f"interval must be 'mean' or an index in [0, {n}) for this {n}-interval adapter, "
            f"got {interval!r}"
        )
    return [1.0 if k == interval else 0.0 for k in range(n)]


def adapter_weight(
    layer: QuantLayer, adapter: Adapter, index: int, weights: list[float]
) -> torch.Tensor:
    """``Σ_k weights[k] · s_out[k] ⊙ (q − z) ⊙ s_in[k]`` of layer ``index`` as ``[O, K]``
    float32 (``K`` = in-channels × kernel, in the weight's own memory order)."""
    codes = layer.unpacked_codes().float().cpu()
    centred = codes - layer.zero.float().cpu()[:, None]
    out = torch.zeros_like(centred)
    # The per-input-channel scale repeats over the kernel positions of a conv's flattened K.
    kernel = centred.shape[1] // (layer.weight_shape[1] if len(layer.weight_shape) > 1 else 1)
    for k, w in enumerate(weights):
        if w == 0.0:
            continue
        s_out, s_in = adapter.layer_scales(index, k)
        term = centred * s_out.detach().float().cpu()[:, None]
        if s_in is not None:
            s_in_k = s_in.detach().float().cpu()
            if isinstance(layer, QuantConv2d) and layer.groups > 1:
                # Grouped conv: the weight's input axis is I/groups; each group's filters see
                # their own slice of the input channels.
                per_group = layer.weight_shape[1]
                group_of = torch.arange(layer.out_channels) * layer.groups // layer.out_channels
                s_in_rows = s_in_k.view(layer.groups, per_group)[group_of]
                term = term * s_in_rows.repeat_interleave(kernel, dim=1)
            else:
                term = term * s_in_k.repeat_interleave(kernel)[None, :]
        out += w * term
    return out


def _float_modules(float_unet: nn.Module, adapter: Adapter) -> dict[str, nn.Module]:
    modules = dict(float_unet.named_modules())
    missing = [s.name for s in adapter.layout.layers if s.name not in modules]
    if missing:
        raise ValueError(
            f"the float UNet lacks {len(missing)} of the adapter's layers (e.g. {missing[0]}); "
            "give the float model the quantized base was made from"
        )
    return {s.name: modules[s.name] for s in adapter.layout.layers}


def _check_same_model(name: str, layer: QuantLayer, w: torch.Tensor) -> None:
    """Re-quantize the float weight ``w[O, K]`` with the base's parameters: the codes must come
    back, else the float model is not the one the base was quantized from."""
    k = int(torch.Size(layer.weight_shape[1:]).numel())
    if tuple(w.shape) != (layer.out_channels, k):
        raise ValueError(
            f"{name}: float weight is {tuple(w.shape)} as [O, K], the base has "
            f"{(layer.out_channels, k)}; give the float model the base was made from"
        )
    codes = quant.quantize(w, layer.s0.float().cpu(), layer.zero.float().cpu(), layer.bits)
    mismatch = (codes != layer.unpacked_codes().cpu()).float().mean().item()
    if mismatch > _MAX_CODE_MISMATCH:
        raise ValueError(
            f"{name}: the float weights do not quantize to the base's codes ({mismatch:.1%} "
            "differ); give the float model the quantized base was made from"
        )


def _layers(
    quantized_unet: nn.Module, float_unet: nn.Module, adapter: Adapter
) -> list[tuple[int, str, QuantLayer, nn.Module]]:
    state = quant_state(quantized_unet)
    if adapter.base_fingerprint != state.fingerprint or adapter.layout != state.layout:
        raise ValueError(
            "adapter was made for another quantized base (fingerprint "
            f"{adapter.base_fingerprint[:12]}…, this base {state.fingerprint[:12]}…)"
        )
    floats = _float_modules(float_unet, adapter)
    return [(i, name, layer, floats[name]) for i, (name, layer) in enumerate(state.layers)]


def _weight_2d(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return weight.detach().float().cpu().reshape(weight.shape[0], -1)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of ``delta[O, K]``: ``(A[rank, K], B[O, rank], relative error)`` with
    ``B @ A`` the closest rank-``rank`` matrix to ``delta`` (Frobenius norm) and the error
    ``‖delta − B·A‖ / ‖delta‖``. Ranks past ``min(O, K)`` are zero rows/columns, so every layer
    of a file has the same rank (one LoRA scale for all, in every diffusers version)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    total = float(s.pow(2).sum())
    error = math.sqrt(float(s[keep:].pow(2).sum()) / total) if total > 0 else 0.0
    return a.float(), b.float(), error


def export_lora(
    quantized_unet: nn.Module,
    float_unet: nn.Module,
    adapter: Adapter,
    *,
    rank: int,
    interval: Interval = "mean",
    include_quantization_error: bool = True,
    dtype: torch.dtype = torch.float32,
    prefix: str = "unet",
    shares: Sequence[float] | None = None,
) -> LoraExport:
    """The adapter as a rank-``rank`` LoRA of ``float_unet`` (module docstring).

    Conv2d layers follow PEFT: ``lora_A`` is a conv with the layer's kernel, stride and padding
    (weight ``[r, I, kh, kw]``) and ``lora_B`` a 1×1 conv (weight ``[O, r, 1, 1]``).
    Keys start with ``prefix``: the pipeline component (``transformer`` for FLUX and SD3).
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    weights = interval_weights(adapter, interval, shares)
    tensors: dict[str, torch.Tensor] = {}
    layer_errors: dict[str, float] = {}
    residual = norm = 0.0
    for index, name, layer, module in _layers(quantized_unet, float_unet, adapter):
        if isinstance(layer, QuantConv2d) and (
            layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros"
        ):
            raise ValueError(
                f"{name}: a PEFT LoRA cannot express a conv with groups={layer.groups}, "
                f"dilation={layer.dilation}, padding_mode={layer.padding_mode!r}; "
                "export the merged UNet instead"
            )
        w_float = _weight_2d(module)
        _check_same_model(name, layer, w_float)
        tuned = adapter_weight(layer, adapter, index, weights)
        if include_quantization_error:
            delta = tuned - w_float
        else:
            delta = tuned - layer.dequantize(torch.float32).cpu().reshape(tuned.shape)
        a, b, error = low_rank(delta, rank)
        squared = float(delta.double().pow(2).sum())
        residual += error**2 * squared
        norm += squared
        layer_errors[name] = error
        shape = layer.weight_shape
        if len(shape) == 4:  # PEFT's conv LoRA: A keeps the kernel, B is 1×1
            a = a.reshape(rank, *shape[1:])
            b = b.reshape(shape[0], rank, 1, 1)
        tensors[f"{prefix}.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{prefix}.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    return LoraExport(
        tensors=tensors,
        rank=rank,
        interval=interval,
        include_quantization_error=include_quantization_error,
        layer_errors=layer_errors,
        error=math.sqrt(residual / norm) if norm > 0 else 0.0,
    )


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_lora(export: LoraExport, path: str | os.PathLike[str]) -> Path:
    """Write the LoRA as one safetensors file (atomically). Its header metadata holds
    ``tuneqdm_export``: JSON with the rank, the interval, and the overall and per-layer relative
    approximation errors ``‖D − B·A‖ / ‖D‖``."""
    return _write_atomic(Path(path), export.tensors, {METADATA_KEY: json.dumps(export.metadata())})


@torch.no_grad()
def merge_adapter(
    quantized_unet: nn.Module,
    float_unet: nn.Module,
    adapter: Adapter,
    *,
    interval: Interval = "mean",
    shares: Sequence[float] | None = None,
) -> nn.Module:
    """Write the adapter's weights into ``float_unet`` in place and return it: every quantized
    layer's float weight becomes ``Ŵ`` (for ``interval``, see :func:`interval_weights`), in
    the float weight's dtype; biases and unquantized parameters are the float model's."""
    weights = interval_weights(adapter, interval, shares)
    for index, name, layer, module in _layers(quantized_unet, float_unet, adapter):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        _check_same_model(name, layer, _weight_2d(module))
        tuned = adapter_weight(layer, adapter, index, weights)
        weight.copy_(tuned.reshape(weight.shape).to(weight.dtype))
    return float_unet


def save_merged_unet(unet: nn.Module, path: str | os.PathLike[str], *, fp16: bool = False) -> Path:
    """Save a merged UNet, in half precision with ``fp16``. A path ending in ``.safetensors``
    gets one file with diffusers' UNet keys (what ``UNet2DConditionModel.from_single_file``
    and ComfyUI's diffusion-model loader read; the UNet config rides in its metadata under
    ``config``); any other path becomes a diffusers model folder (``save_pretrained``)."""
    path = Path(path)
    if fp16:
        unet = unet.to(torch.float16)
    if path.suffix != ".safetensors":
        unet.save_pretrained(path, safe_serialization=True)  # type: ignore[operator]
        return path
    tensors = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    config = dict(unet.config)  # type: ignore[arg-type]
    return _write_atomic(path, tensors, {"config": json.dumps(config, default=list)})


Format = Literal["lora", "merged"]
FORMATS = ("lora", "merged")


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_adapter` writes: ``format`` ``lora`` (one ``.safetensors``) or
    ``merged`` (a UNet: one ``.safetensors`` or a folder, by the output path); ``rank`` for a
    LoRA; ``interval`` (an index or ``"mean"``); ``fp16`` halves a merged UNet."""

    format: Format = "lora"
    rank: int = 16
    interval: Interval = "mean"
    include_quantization_error: bool = True
    fp16: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.rank < 1:
            raise ValueError(f"rank must be at least 1, got {self.rank}")


def load_float_unet(source: str | os.PathLike[str]) -> nn.Module:
    """The float UNet of a diffusers model folder or hub id (the weights a base was quantized
    from)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(source), subfolder="unet").eval()


def export_adapter(
    quantized_unet: nn.Module,
    float_unet: nn.Module,
    adapter: Adapter,
    out: str | os.PathLike[str],
    options: ExportOptions,
    extra: dict[str, Any] | None = None,
    *,
    prefix: str = "unet",
    shares: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Write ``adapter`` to ``out`` as ``options`` say; returns the export's metadata (for a
    LoRA, with its overall relative error). ``float_unet`` is changed in place by a merge."""
    summary: dict[str, Any] = {"format": options.format, "interval": options.interval}
    if options.format == "lora":
        export = export_lora(
            quantized_unet,
            float_unet,
            adapter,
            rank=options.rank,
            interval=options.interval,
            include_quantization_error=options.include_quantization_error,
            dtype=torch.float16 if options.fp16 else torch.float32,
            prefix=prefix,
            shares=shares,
        )
        export.extra = dict(extra or {})
        save_lora(export, out)
        return export.metadata()
    merged = merge_adapter(
        quantized_unet, float_unet, adapter, interval=options.interval, shares=shares
    )
    save_merged_unet(merged, out, fp16=options.fp16)
    return {**summary, "fp16": options.fp16, **(extra or {})}
