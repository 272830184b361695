"""Frozen quantized Linear / Conv2d layers whose scales act on activations.

For a layer with base weight ``W0 = s0 ⊙ (q − z)`` and an adapter's ``(s_out, s_in)``
(docs/method.md)::

    y = (s_out / s0) ⊙ base(W0, s_in ⊙ x) + bias

which equals ``x ↦ Ŵ x + bias`` with ``Ŵ = s_out ⊙ (q − z) ⊙ s_in`` (the paper's MCSU
weight) without ever building ``Ŵ``. ``base`` is :class:`_FrozenProduct`: it dequantizes
``W0`` in forward and again in backward, so autograd keeps nothing weight-sized; the scale
multiplications around it keep only activation-sized tensors.

Uniform fast path: when every sample of the batch reads the same scale row (one adapter at one
timestep: nearly every generation) and nothing needs a gradient, a layer applies each scale on
whichever side is smaller — the weight (a scratch buffer, never kept) or the activation. In the
packed mode ``s_out`` replaces ``s0`` in the dequantization, so the output scale is free there.
Training and mixed batches take the per-sample path above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input

from tuneqdm_core import quant

if TYPE_CHECKING:
    from tuneqdm_core.model import QuantState


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the base product runs in: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _FrozenProduct(torch.autograd.Function):
    """``base(W0, x)`` with no gradient w.r.t. the frozen weight and nothing weight-sized saved."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLayer, with_bias: bool) -> torch.Tensor:
        ctx.layer = layer
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        dtype = compute_dtype(x)
        bias = layer.bias.to(dtype) if with_bias and layer.bias is not None else None
        return layer.product(x.to(dtype), layer.frozen_weight(dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        layer: QuantLayer = ctx.layer
        # Packed: re-dequantize instead of saving W0: ~one extra dequantization per step buys
        # the weight-sized memory that materialising implementations keep (docs/method.md).
        grad_x = layer.input_grad(grad_y, layer.frozen_weight(grad_y.dtype), ctx.x_shape)
        return grad_x.to(ctx.x_dtype), None, None


class QuantLayer(nn.Module):
    """Common part of :class:`QuantLinear` and :class:`QuantConv2d`.

    Buffers (never Parameters): ``codes`` (uint8; two 4-bit codes per byte at 4 bits),
    ``s0[O]`` and ``zero[O]`` (float32), ``bias[O]`` (float32, optional).
    """

    # Dimension of the channel axis in activations: 1 for NCHW convs, -1 for Linear.
    channel_dim: int
    groups = 1  # QuantConv2d: its conv's groups
    codes: torch.Tensor
    s0: torch.Tensor
    zero: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        module: nn.Linear | nn.Conv2d,
        bits: int,
        range_method: quant.RangeMethod,
        **range_options: Any,
    ) -> None:
        super().__init__()
        weight, bias = module.weight, module.bias
        self.bits = bits
        self.weight_shape = tuple(weight.shape)
        w2d = weight.detach().reshape(weight.shape[0], -1).float()
        s0, zero = quant.choose_qparams(w2d, bits, range_method, **range_options)
        codes = quant.quantize(w2d, s0, zero, bits)
        self.register_buffer("codes", quant.pack_int4(codes) if bits == 4 else codes)
        self.register_buffer("s0", s0)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        # Set by quantize_(): position in the model's layout and the shared routing state.
        self.index = -1
        self.state: QuantState | None = None
        # The resident storage mode's dequantized W0 (set_storage_mode); a plain attribute,
        # not a buffer, so it never enters a state_dict, a cache file or the fingerprint.
        self.resident: torch.Tensor | None = None

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        raise NotImplementedError

    def unpacked_codes(self) -> torch.Tensor:
        """Integer codes ``q[O, K]`` (uint8)."""
        k = int(torch.Size(self.weight_shape[1:]).numel())
        return quant.unpack_int4(self.codes, k) if self.bits == 4 else self.codes

    def dequantize(
        self,
        dtype: torch.dtype = torch.float32,
        *,
        scratch: bool = False,
        s_out: torch.Tensor | None = None,
        s_in: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``W0 = s0 · (q − z)`` in the layer's weight shape.

        Same values as :func:`quant.dequantize`, computed in place in one float buffer (codes
        unpacked straight into it). With ``scratch=True`` that buffer is the model's reusable
        workspace, valid only until the next dequantization on this thread: the frozen
        product uses it so that a step does not allocate (and page-fault in) a fresh
        weight-sized buffer per layer and pass, which dominated CPU step time.

        ``s_out[O]`` (and ``s_in[I]``) given: ``Ŵ = s_out ⊙ (q − z) ⊙ s_in`` instead, built
        the same way in as many passes (both scales in the one multiplication, through their
        outer product) and rounded to ``dtype`` once (the uniform fast path).
        """
        work = torch.promote_types(self.s0.dtype, torch.float32)
        rows = self.out_channels
        k = int(torch.Size(self.weight_shape[1:]).numel())
        width = k + k % 2 if self.bits == 4 else k
        if scratch and self.state is not None:
            w = self.state.scratch("weight", rows * width, work, self.s0.device).view(rows, width)
        else:
            w = torch.empty(rows, width, dtype=work, device=self.s0.device)
        if self.bits == 4:
            w[:, 0::2] = self.codes & 0x0F
            w[:, 1::2] = self.codes >> 4
        else:
            w.copy_(self.codes)
        scale = self.s0 if s_out is None else s_out.to(work)
        if width != k:  # odd K at 4 bits: drop the padding code
            w = w[:, :k]
        w.sub_(self.zero[:, None])
        if s_in is None:
            w.mul_(scale[:, None])
        else:  # one pass for both scales: their outer product is ≤ 1/kh·kw of the weight
            self._grouped(w).mul_(self._outer(scale, s_in.to(work)))
        if not w.is_contiguous():
            w = w.contiguous()
        if dtype != work:
            if scratch and self.state is not None:
                cast = self.state.scratch("cast", rows * k, dtype, self.s0.device)
                w = cast.view(rows, k).copy_(w)
            else:
                w = w.to(dtype)
        return w.view(self.weight_shape)

    def resident_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The resident copy of ``W0`` if there is one in ``dtype`` on the codes' device."""
        resident = self.resident
        if resident is not None and resident.dtype == dtype and resident.device == self.s0.device:
            return resident
        return None

    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``W0`` in ``dtype`` for one pass: the resident copy when there is one in that dtype,
        else dequantized from the codes (exact in any dtype: a pass at another precision than
        the resident copy's never sees a rounded W0; nor does a model moved to another device)."""
        resident = self.resident_weight(dtype)
        if resident is not None:
            return resident
        return self.dequantize(dtype, scratch=True)

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """``w[O, K]`` (or the weight) viewed as ``[g, O/g, I/g, K·g/I]``."""
        g = self.groups
        return w.view(g, self.out_channels // g, self.in_channels // g, -1)

    def _outer(self, s_out: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        """``s_out[o] · s_in[i]`` for each weight row and input channel that row sees, shaped
        to multiply :meth:`_grouped` (a grouped conv's row ``o`` sees its group's inputs)."""
        g = self.groups
        return s_out.view(g, -1, 1, 1) * s_in.view(g, 1, -1, 1)

    def output_numel(self, x: torch.Tensor) -> int:
        """Number of elements of this layer's output for input ``x``."""
        raise NotImplementedError

    def product(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        raise NotImplementedError

    def input_grad(
        self, grad_y: torch.Tensor, w: torch.Tensor, x_shape: torch.Size
    ) -> torch.Tensor:
        raise NotImplementedError

    def _broadcast(self, s: torch.Tensor, ndim: int) -> torch.Tensor:
        """``s[B or 1, C]`` shaped to scale an ``ndim``-dim activation along its channel axis."""
        if self.channel_dim == -1:
            return s.view(s.shape[0], *([1] * (ndim - 2)), s.shape[1])
        return s.view(s.shape[0], s.shape[1], *([1] * (ndim - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        scales = None if state is None else state.lookup(self.index, x.shape[0])
        if scales is None:  # the plain quantized base: bias fused into the product
            return _FrozenProduct.apply(x, self, True)
        s_out, s_in = scales
        if (
            s_out.shape[0] == 1
            and state is not None
            and state.uniform_fast_path
            and not (
                torch.is_grad_enabled()
                and (
                    x.requires_grad
                    or s_out.requires_grad
                    or (s_in is not None and s_in.requires_grad)
                )
            )
        ):
            y = self._uniform(x, s_out[0], None if s_in is None else s_in[0])
            if y is not None:
                return y
        # The scale arithmetic runs at the scales' precision (float32), never at a 16-bit
        # activation dtype: cast to bf16, a scale near 1 moves in steps of ~8e-3, and a 1e-3
        # training step of s_out or s_in would change nothing (docs/method.md, "Precision").
        # Type promotion does it: bf16 ⊙ float32 is float32, so under autocast a routed
        # layer returns float32 and the next product casts it down again.
        if s_in is not None:
            x = x * self._broadcast(s_in, x.ndim)
        y = _FrozenProduct.apply(x, self, False)
        ratio = self._broadcast(s_out / self.s0, y.ndim)
        if self.bias is None:
            return y * ratio
        # One pass for the output scale and the bias.
        return torch.addcmul(self._broadcast(self.bias[None], y.ndim), y, ratio)

    def _uniform(
        self, x: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The routed layer when the whole batch reads one row ``s_out[O]``, ``s_in[I]`` and
        nothing needs a gradient; ``None`` where the per-sample path must run instead.

        At full precision (the products run in the scales' dtype) each scale goes on the
        weight or on the activation, whichever has fewer elements. With 16-bit products a
        scale must meet a value before that value is rounded to 16 bits, else a scale within
        half a bf16 step of 1 (≈ 2e-3) changes nothing (see :meth:`forward`): packed, both
        scales go into the float32 dequantization, rounded once with the weight; resident
        (a weight already rounded to 16 bits) keeps the per-sample path's float32 passes.
        """
        dtype = compute_dtype(x)
        full = dtype == torch.promote_types(dtype, s_out.dtype)
        weight_numel = int(torch.Size(self.weight_shape).numel())
        in_on_weight = s_in is not None and (not full or weight_numel < x.numel())
        resident = self.resident_weight(dtype)
        ratio = None
        if resident is None:  # packed: s_out replaces s0 in the dequantization, for free
            w = self.dequantize(
                dtype, scratch=True, s_out=s_out, s_in=s_in if in_on_weight else None
            )
        elif not full:
            return None
        else:
            route = None if self.state is None else self.state.route
            ratio = None if route is None else route.ratio(self.index)
            if ratio is None:
                ratio = s_out / self.s0
            out_on_weight = weight_numel < self.output_numel(x)
            w = resident
            if out_on_weight or in_on_weight:
                assert self.state is not None
                w = self.state.scratch("scaled", weight_numel, dtype, resident.device)
                w = w.view(self.weight_shape)
                g = self.groups
                if not in_on_weight:
                    scale = ratio.view(g, -1, 1, 1)
                elif not out_on_weight:
                    scale = s_in.view(g, 1, -1, 1)  # type: ignore[union-attr]
                else:  # one pass for both
                    scale = self._outer(ratio, s_in)  # type: ignore[arg-type]
                torch.mul(self._grouped(resident), scale, out=self._grouped(w))
                if out_on_weight:
                    ratio = None
        if s_in is not None and not in_on_weight:
            x = x * self._broadcast(s_in[None], x.ndim)
        if ratio is None:  # bias fused into the product
            bias = None if self.bias is None else self.bias.to(dtype)
            y = self.product(x.to(dtype), w, bias)
            if torch.is_autocast_enabled(x.device.type):
                return y  # the next product casts anyway; the bare layer returns this dtype too
            # The per-sample path's output dtype: the scales' where they are wider (a float64
            # base fed float32 latents returns float64, as the next layer's parameters expect).
            return y.to(torch.promote_types(y.dtype, s_out.dtype))
        y = self.product(x.to(dtype), w)
        ratio = self._broadcast(ratio[None], y.ndim)
        if self.bias is None:
            return y * ratio
        return torch.addcmul(self._broadcast(self.bias[None], y.ndim), y, ratio)


class QuantLinear(QuantLayer):
    channel_dim = -1

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1]

    # nn.Linear's names: diffusers' SDXL pipeline reads add_embedding.linear_1.in_features.
    @property
    def in_features(self) -> int:
        return self.in_channels

    @property
    def out_features(self) -> int:
        return self.out_channels

    def product(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.linear(x, w, bias)

    def input_grad(
        self, grad_y: torch.Tensor, w: torch.Tensor, x_shape: torch.Size
    ) -> torch.Tensor:
        return grad_y @ w

    def output_numel(self, x: torch.Tensor) -> int:
        return x.numel() // self.in_channels * self.out_channels

    def extra_repr(self) -> str:
        return f"in={self.in_channels}, out={self.out_channels}, bits={self.bits}"


class QuantConv2d(QuantLayer):
    channel_dim = 1

    def __init__(
        self, module: nn.Conv2d, bits: int, range_method: quant.RangeMethod, **options: Any
    ) -> None:
        if isinstance(module.padding, str):
            raise NotImplementedError(
                f"Conv2d with padding={module.padding!r} is not supported; "
                "use explicit integer padding"
            )
        super().__init__(module, bits, range_method, **options)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.padding_mode = module.padding_mode
        # Non-zero padding modes pad explicitly before the product (F.pad commutes with the
        # per-channel s_in scaling since it only copies values within a channel).
        self.explicit_pad = module._reversed_padding_repeated_twice
        self.padding = (0, 0) if self.padding_mode != "zeros" else tuple(module.padding)

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    def output_numel(self, x: torch.Tensor) -> int:
        size = x.shape[0] * self.out_channels
        sides = zip(
            x.shape[2:],
            self.weight_shape[2:],
            self.stride,
            self.padding,
            self.dilation,
            strict=True,
        )
        for side, kernel, stride, pad, dilation in sides:
            size *= (side + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self.explicit_pad, mode=self.padding_mode)
        return super().forward(x)

    def product(
        self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(
        self, grad_y: torch.Tensor, w: torch.Tensor, x_shape: torch.Size
    ) -> torch.Tensor:
        return conv2d_input(
            x_shape, w, grad_y, self.stride, self.padding, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_channels}, out={self.out_channels}, kernel={self.weight_shape[2:]}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, bits={self.bits}"
        )
