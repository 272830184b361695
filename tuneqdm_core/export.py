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

A LoRA's rank is fixed (``rank``: every layer, zero-padded where a layer is smaller) or chosen
per layer (``max_relative_error``: the smallest rank whose truncated SVD keeps each layer's
relative error ``‖D − B·A‖ / ‖D‖`` within the bound, so the file's overall error is within it
too — kohya's dynamic resizing by Frobenius norm). Three file formats (``FORMATS``):

- ``lora``: PEFT keys ``unet.{layer}.lora_A/lora_B.weight`` (diffusers' ``load_lora_weights``);
- ``lora-kohya``: kohya/A1111 keys ``lora_unet_{layer}.lora_down/lora_up.weight`` and
  ``.alpha`` (= the layer's rank, so each layer's scale is 1), the layer named as kohya's
  trainers name it: diffusers' module names for SD 1.x/2.x, the original (SGM) names for SDXL;
- ``merged`` (a UNet: diffusers' keys, or a folder) and ``merged-checkpoint`` (the whole
  pipeline — UNet with the adapter written in, VAE, text encoders — as one original-layout
  checkpoint, the file A1111, ComfyUI and ``from_single_file`` read).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from tuneqdm_core import quant
from tuneqdm_core.adapter import Adapter
from tuneqdm_core.files import write_atomic
from tuneqdm_core.layers import QuantConv2d, QuantLayer
from tuneqdm_core.ldm_layout import ldm_module_name, pipeline_to_ldm, xl_pipeline_to_ldm
from tuneqdm_core.model import quant_state

Interval = int | str  # an interval index, or "mean"
METADATA_KEY = "tuneqdm_export"
# A fixed-rank LoRA that loses more than this share of the adapter's weight change (relative
# Frobenius error) gets a warning in its summary: its images will visibly differ from the
# adapter's.
WARN_RELATIVE_ERROR = 0.1
# A float UNet whose re-quantized codes differ from the base's in more than this share of
# weights is not the model the base was quantized from (a few codes may round the other way
# when the base was quantized on another device).
_MAX_CODE_MISMATCH = 1e-3


@dataclass
class LoraExport:
    """A LoRA ready to save: ``tensors`` keyed ``unet.{layer}.lora_A.weight`` /
    ``lora_B.weight`` and the numbers that go in the file's metadata."""

    tensors: dict[str, torch.Tensor]
    rank: int  # the largest layer rank
    interval: Interval
    include_quantization_error: bool
    layer_errors: dict[str, float]
    error: float
    extra: dict[str, Any] = field(default_factory=dict)
    # Per layer, where ranks were chosen by max_relative_error (else every layer has ``rank``).
    layer_ranks: dict[str, int] = field(default_factory=dict)
    max_relative_error: float | None = None

    def metadata(self) -> dict[str, Any]:
        chosen = {}
        if self.max_relative_error is not None:
            chosen = {
                "max_relative_error": self.max_relative_error,
                "layer_ranks": self.layer_ranks,
            }
        return {
            "format": "peft-lora",
            "rank": self.rank,
            **chosen,
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


def rank_for_error(singular_values: torch.Tensor, max_relative_error: float) -> int:
    """The smallest rank (≥ 1) whose truncated SVD leaves a relative Frobenius error of at
    most ``max_relative_error``, from the singular values in descending order."""
    energy = singular_values.double().pow(2)
    total = float(energy.sum())
    if total == 0.0:
        return 1
    # tail[k] = Σ_{i ≥ k} σ_i² / total: the squared error of rank k.
    tail = [*(energy.flip(0).cumsum(0).flip(0) / total).tolist(), 0.0]
    bound = max_relative_error**2
    return max(1, next(k for k, left in enumerate(tail) if left <= bound))


def low_rank(
    delta: torch.Tensor, rank: int | None, max_relative_error: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of ``delta[O, K]``: ``(A[r, K], B[O, r], relative error)`` with ``B @ A``
    the closest rank-``r`` matrix to ``delta`` (Frobenius norm) and the error
    ``‖delta − B·A‖ / ‖delta‖``. ``rank``: ``r = rank``, ranks past ``min(O, K)`` zero
    rows/columns, so every layer of a file has the same rank; ``max_relative_error`` instead:
    ``r`` the smallest rank within it (:func:`rank_for_error`)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    if max_relative_error is not None:
        rank = rank_for_error(s, max_relative_error)
    assert rank is not None
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
    rank: int | None = None,
    interval: Interval = "mean",
    include_quantization_error: bool = True,
    dtype: torch.dtype = torch.float32,
    max_relative_error: float | None = None,
    prefix: str = "unet",
    shares: Sequence[float] | None = None,
) -> LoraExport:
    """The adapter as a LoRA of ``float_unet`` (module docstring): rank ``rank`` in every
    layer, or per layer the smallest rank within ``max_relative_error`` (give one of them).

    Conv2d layers follow PEFT: ``lora_A`` is a conv with the layer's kernel, stride and padding
    (weight ``[r, I, kh, kw]``) and ``lora_B`` a 1×1 conv (weight ``[O, r, 1, 1]``).
    Keys start with ``prefix``: the pipeline component (``transformer`` for FLUX and SD3).
    """
    _check_rank_choice(rank, max_relative_error)
    layer_ranks: dict[str, int] = {}
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
        a, b, error = low_rank(delta, rank, max_relative_error)
        layer_rank = layer_ranks[name] = a.shape[0]
        squared = float(delta.double().pow(2).sum())
        residual += error**2 * squared
        norm += squared
        layer_errors[name] = error
        shape = layer.weight_shape
        if len(shape) == 4:  # PEFT's conv LoRA: A keeps the kernel, B is 1×1
            a = a.reshape(layer_rank, *shape[1:])
            b = b.reshape(shape[0], layer_rank, 1, 1)
        tensors[f"{prefix}.{name}.lora_A.weight"] = a.to(dtype).contiguous()
        tensors[f"{prefix}.{name}.lora_B.weight"] = b.to(dtype).contiguous()
    return LoraExport(
        tensors=tensors,
        rank=max(layer_ranks.values()),
        interval=interval,
        include_quantization_error=include_quantization_error,
        layer_errors=layer_errors,
        error=math.sqrt(residual / norm) if norm > 0 else 0.0,
        layer_ranks=layer_ranks if max_relative_error is not None else {},
        max_relative_error=max_relative_error,
    )


def _check_rank_choice(rank: int | None, max_relative_error: float | None) -> None:
    if (rank is None) == (max_relative_error is None):
        raise ValueError("give a LoRA either a rank or a max_relative_error, not both")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if max_relative_error is not None and not 0.0 < max_relative_error < 1.0:
        raise ValueError(f"max_relative_error must be in (0, 1), got {max_relative_error}")


def _write_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


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
    _merge(quantized_unet, float_unet, adapter, interval, None, shares)
    return float_unet


@torch.no_grad()
def _merge(
    quantized_unet: nn.Module,
    float_unet: nn.Module,
    adapter: Adapter,
    interval: Interval,
    stored: torch.dtype | None,
    shares: Sequence[float] | None = None,
) -> float:
    """:func:`merge_adapter`; returns ``‖Ŵ − saved‖ / ‖Ŵ‖`` over all layers, ``saved`` the
    weights as they will be stored in ``stored`` (None: the float model's dtype)."""
    weights = interval_weights(adapter, interval, shares)
    residual = norm = 0.0
    for index, name, layer, module in _layers(quantized_unet, float_unet, adapter):
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        _check_same_model(name, layer, _weight_2d(module))
        tuned = adapter_weight(layer, adapter, index, weights)
        weight.copy_(tuned.reshape(weight.shape).to(weight.dtype))
        saved = weight.detach().to(stored or weight.dtype).float().cpu().reshape(tuned.shape)
        residual += float((saved.double() - tuned.double()).pow(2).sum())
        norm += float(tuned.double().pow(2).sum())
    return math.sqrt(residual / norm) if norm > 0 else 0.0


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


def _is_xl(unet_config: Any) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def kohya_name(name: str, unet_config: Any) -> str:
    """The kohya/A1111 name of UNet layer ``name``: ``lora_unet_`` and the module path with
    ``_`` for ``.``, in diffusers' names for SD 1.x/2.x (kohya trains those on diffusers' UNet)
    and in the original SGM names for SDXL (as kohya's SDXL trainer writes them)."""
    module = ldm_module_name(name, unet_config) if _is_xl(unet_config) else name
    return "lora_unet_" + module.replace(".", "_")


def kohya_tensors(export: LoraExport, unet_config: Any) -> dict[str, torch.Tensor]:
    """The LoRA in kohya's keys: ``lora_down`` = A, ``lora_up`` = B, ``alpha`` = the layer's
    rank (a loader scales B·A by alpha / rank: 1 here, as the PEFT file means it)."""
    out: dict[str, torch.Tensor] = {}
    suffix = ".lora_A.weight"
    for key, down in export.tensors.items():
        if not key.endswith(suffix):
            continue
        name = key[len("unet.") : -len(suffix)]
        prefix = kohya_name(name, unet_config)
        out[f"{prefix}.lora_down.weight"] = down
        out[f"{prefix}.lora_up.weight"] = export.tensors[f"unet.{name}.lora_B.weight"]
        out[f"{prefix}.alpha"] = torch.tensor(float(down.shape[0]), dtype=down.dtype)
    return out


def save_merged_checkpoint(
    pipeline: Any, path: str | os.PathLike[str], *, fp16: bool = False
) -> Path:
    """The pipeline (its UNet merged) as one original-layout ``.safetensors`` checkpoint:
    UNet, VAE and text encoder(s) under the LDM/SGM key names single-file loaders read."""
    state = (
        xl_pipeline_to_ldm(pipeline) if _is_xl(pipeline.unet.config) else pipeline_to_ldm(pipeline)
    )
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return _write_atomic(Path(path), state, {})


Format = Literal["lora", "lora-kohya", "merged", "merged-checkpoint"]
FORMATS: tuple[str, ...] = ("lora", "lora-kohya", "merged", "merged-checkpoint")
LORA_FORMATS = ("lora", "lora-kohya")
DEFAULT_RANK = 16


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_adapter` writes (``format``, module docstring): a LoRA (one
    ``.safetensors``) of rank ``rank`` (default 16) or, with ``max_relative_error``, of
    per-layer ranks within it; a merged UNet (one ``.safetensors`` or a folder, by the output
    path); or a merged original-layout checkpoint (one ``.safetensors``). ``interval`` (an
    index or ``"mean"``); ``fp16`` halves the stored tensors."""

    format: Format = "lora"
    rank: int | None = None
    interval: Interval = "mean"
    include_quantization_error: bool = True
    fp16: bool = False
    max_relative_error: float | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.rank is not None and self.max_relative_error is not None:
            raise ValueError("give a LoRA either a rank or a max_relative_error, not both")
        _check_rank_choice(self.lora_rank, self.max_relative_error)

    @property
    def lora_rank(self) -> int | None:
        """The fixed rank (None where max_relative_error chooses the ranks)."""
        if self.max_relative_error is not None:
            return None
        return DEFAULT_RANK if self.rank is None else self.rank


def load_float_unet(source: str | os.PathLike[str]) -> nn.Module:
    """The float UNet of a diffusers model folder or hub id (the weights a base was quantized
    from)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(source), subfolder="unet").eval()


def load_float_pipeline(source: str | os.PathLike[str]) -> Any:
    """The float pipeline of a diffusers model folder or hub id (for a merged checkpoint)."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(source))


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def export_adapter(
    quantized_unet: nn.Module,
    float_unet: nn.Module,
    adapter: Adapter,
    out: str | os.PathLike[str],
    options: ExportOptions,
    extra: dict[str, Any] | None = None,
    *,
    pipeline: Any = None,
    prefix: str = "unet",
    shares: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Write ``adapter`` to ``out`` as ``options`` say; returns the export's summary: its
    format, ``relative_error`` against the adapter's weights (a LoRA's truncation error, or a
    merge's rounding to the stored dtype), ``bytes`` written, and ``warnings`` (a fixed-rank
    LoRA losing more than ``WARN_RELATIVE_ERROR``). ``float_unet`` is changed in place by a
    merge; ``merged-checkpoint`` needs the float ``pipeline`` whose UNet ``float_unet`` is."""
    out = Path(out)
    dtype = torch.float16 if options.fp16 else torch.float32
    warnings: list[str] = []
    if options.format in LORA_FORMATS:
        export = export_lora(
            quantized_unet,
            float_unet,
            adapter,
            rank=options.lora_rank,
            interval=options.interval,
            include_quantization_error=options.include_quantization_error,
            dtype=dtype,
            max_relative_error=options.max_relative_error,
            prefix=prefix,
            shares=shares,
        )
        export.extra = dict(extra or {})
        metadata = export.metadata()
        if options.format == "lora":
            save_lora(export, out)
        else:
            metadata["format"] = "kohya-lora"
            tensors = kohya_tensors(export, float_unet.config)
            _write_atomic(out, tensors, {METADATA_KEY: json.dumps(metadata)})
        if options.max_relative_error is None and export.error > WARN_RELATIVE_ERROR:
            warnings.append(
                f"rank {export.rank} keeps the adapter's weights only to a relative error of "
                f"{export.error:.3f} (above {WARN_RELATIVE_ERROR}): its images will differ from "
                "the adapter's; ask for max_relative_error (e.g. 0.05) or a higher rank, or "
                "export a merged model"
            )
        return {**metadata, "bytes": _size(out), "warnings": warnings}
    if options.format == "merged-checkpoint":
        if pipeline is None or pipeline.unet is not float_unet:
            raise ValueError("a merged checkpoint needs the float pipeline whose UNet is merged")
        if out.suffix != ".safetensors":
            raise ValueError(f"a merged checkpoint is one .safetensors file, got {out}")
    error = _merge(quantized_unet, float_unet, adapter, options.interval, dtype, shares)
    if options.format == "merged-checkpoint":
        save_merged_checkpoint(pipeline, out, fp16=options.fp16)
    else:
        save_merged_unet(float_unet, out, fp16=options.fp16)
    return {
        "format": options.format,
        "interval": options.interval,
        "fp16": options.fp16,
        "relative_error": error,
        **(extra or {}),
        "bytes": _size(out),
        "warnings": warnings,
    }
