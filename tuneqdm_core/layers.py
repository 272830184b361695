"""Frozen quantized Linear / Conv2d layers whose scales act on activations.

For a layer with base weight ``W0 = s0 ⊙ (q − z)`` and an adapter's ``(s_out, s_in)``
(docs/method.md)::

    y = (s_out / s0) ⊙ base(W0, s_in ⊙ x) + bias

which equals ``x ↦ Ŵ x + bias`` with ``Ŵ = s_out ⊙ (q − z) ⊙ s_in`` (the paper's MCSU
weight) without ever building ``Ŵ``. ``base`` is :class:`_FrozenProduct`: it dequantizes
``W0`` in forward and again in backward, so autograd keeps nothing weight-sized; the scale
multiplications around it keep only activation-sized tensors.
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
        self, dtype: torch.dtype = torch.float32, *, scratch: bool = False
    ) -> torch.Tensor:
        """``W0 = s0 · (q − z)`` in the layer's weight shape.

        Same values as :func:`quant.dequantize`, computed in place in one float buffer (codes
        unpacked straight into it). With ``scratch=True`` that buffer is the model's reusable
        workspace, valid only until the next dequantization on this thread: the frozen
        product uses it so that a step does not allocate (and page-fault in) a fresh
        weight-sized buffer per layer and pass, which dominated CPU step time.
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
        w.sub_(self.zero[:, None]).mul_(self.s0[:, None])
        if width != k:  # odd K at 4 bits: drop the padding code
            w = w[:, :k].contiguous()
        if dtype != work:
            if scratch and self.state is not None:
                cast = self.state.scratch("cast", rows * k, dtype, self.s0.device)
                w = cast.view(rows, k).copy_(w)
            else:
                w = w.to(dtype)
        return w.view(self.weight_shape)

    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """``W0`` in ``dtype`` for one pass: the resident copy when there is one in that dtype,
        else dequantized from the codes (exact in any dtype: a pass at another precision than
        the resident copy's never sees a rounded W0; nor does a model moved to another device)."""
        resident = self.resident
        if resident is not None and resident.dtype == dtype and resident.device == self.s0.device:
            return resident
        return self.dequantize(dtype, scratch=True)

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
        scales = None if self.state is None else self.state.lookup(self.index, x.shape[0])
        if scales is None:  # the plain quantized base: bias fused into the product
            return _FrozenProduct.apply(x, self, True)
        s_out, s_in = scales
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
