"""Weight-only, per-output-channel, asymmetric uniform quantization as small pure functions.

Shapes: a weight is viewed as ``w[O, K]`` (``K`` = everything but the output channel, e.g.
``I/groups * kh * kw`` for a conv). ``W ≈ s0[o] · (q[o, k] − z[o])`` with integer codes
``q ∈ [0, 2^bits − 1]`` (docs/method.md). ``s0`` and ``z`` are float32 per channel;
``z`` is kept fractional so that the channel's range maps onto the code range exactly.
"""

from __future__ import annotations

from typing import Literal

import torch

Bits = Literal[4, 8]
RangeMethod = Literal["minmax", "mse"]

# Smallest base scale: a channel of all-equal weights (often all zeros) still gets a finite
# s0, so s_out / s0 stays defined.
_MIN_SCALE = 1e-8


def qmax(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    return (1 << bits) - 1


def _qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    scale = ((hi - lo) / qmax(bits)).clamp_min(_MIN_SCALE)
    return scale, -lo / scale


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Quantize-dequantize ``w[O, K]`` with per-row ``scale[O]``, ``zero[O]``."""
    q = torch.clamp(torch.round(w / scale[:, None] + zero[:, None]), 0, qmax(bits))
    return (q - zero[:, None]) * scale[:, None]


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    method: RangeMethod = "mse",
    *,
    grid: int = 24,
    shrink: float = 0.5,
    p: float = 2.0,
    chunk_elements: int = 1 << 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale[O], zero[O])`` for ``w[O, K]``.

    ``minmax`` spans each row's [min, max]. ``mse`` shrinks that range by ``α`` on a grid of
    ``grid`` values in ``[1 − shrink, 1]`` and keeps, per row, the α with the smallest
    ``Σ |w − Q(w)|^p`` (the cheap per-channel range search; Q-Diffusion/BRECQ use the
    same L_p objective). Rows are processed in chunks of ``chunk_elements`` to bound memory.
    """
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight view [O, K], got shape {tuple(w.shape)}")
    w = w.detach().float()
    lo_all, hi_all = w.amin(dim=1), w.amax(dim=1)
    if method == "minmax":
        scale, zero = _qparams_from_range(lo_all, hi_all, bits)
        return scale, zero
    if method != "mse":
        raise ValueError(f"range method must be 'minmax' or 'mse', got {method!r}")

    scales, zeros = [], []
    rows_per_chunk = max(1, chunk_elements // max(1, w.shape[1]))
    alphas = torch.linspace(1.0, 1.0 - shrink, grid).tolist()
    top = float(qmax(bits))
    for start in range(0, w.shape[0], rows_per_chunk):
        rows = w[start : start + rows_per_chunk]
        lo, hi = lo_all[start : start + rows_per_chunk], hi_all[start : start + rows_per_chunk]
        best_err = torch.full_like(lo, float("inf"))
        best_scale, best_zero = _qparams_from_range(lo, hi, bits)
        buf = torch.empty_like(rows)
        for alpha in alphas:
            scale, zero = _qparams_from_range(lo * alpha, hi * alpha, bits)
            # fake_quantize(rows) − rows, in place: this loop is the cost of quantizing a
            # model (≈0.02 s per million weights on 2 CPU cores at grid=24;
            # chunks of ~1M elements stay in cache, 16M-element chunks ran 2× slower).
            torch.div(rows, scale[:, None], out=buf)
            buf.add_(zero[:, None]).round_().clamp_(0, top).sub_(zero[:, None])
            buf.mul_(scale[:, None]).sub_(rows).abs_()
            err = buf.pow_(p).sum(dim=1) if p != 2.0 else torch.linalg.vecdot(buf, buf)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
        scales.append(best_scale)
        zeros.append(best_zero)
    return torch.cat(scales), torch.cat(zeros)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes ``q[O, K]`` (uint8, one code per element) of ``w[O, K]``."""
    q = torch.round(w.detach().float() / scale[:, None] + zero[:, None])
    return q.clamp_(0, qmax(bits)).to(torch.uint8)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``W0[O, K] = s0 · (q − z)`` in ``dtype`` from unpacked ``codes[O, K]``.

    The arithmetic runs in float32 (float64 when the parameters are float64) and is cast once,
    so bf16/fp16 callers get the exact weight rounded once.
    """
    work = torch.promote_types(scale.dtype, torch.float32)
    # In place: one weight-sized float temporary at a time (this runs in every backward too).
    w = codes.to(work).sub_(zero[:, None]).mul_(scale[:, None])
    return w.to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: ``codes[O, K]`` → ``packed[O, ceil(K/2)]``.

    Element ``2j`` goes to the low nibble of byte ``j``, element ``2j+1`` to the high nibble;
    an odd ``K`` is padded with a zero code.
    """
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.view(codes.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``packed[O, ceil(K/2)]`` → ``codes[O, K]``."""
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1)
    return codes[:, :k]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's error measure)."""
    signal = reference.double().pow(2).sum()
    noise = (reference.double() - approx.double()).pow(2).sum()
    return float(10 * torch.log10(signal / noise.clamp_min(1e-300)))
