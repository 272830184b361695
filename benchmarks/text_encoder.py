"""The T5 encoder of FLUX.1 and SD3.5 in float and at 8 bits (``text_encoder_bits=8``), side by
side: bytes held, time to quantize, time to encode a prompt, and how far the embeddings move.

    PYTHONPATH=. python benchmarks/text_encoder.py [--layers 2] [--tokens 512] [--reps 3]
        [--device cpu] [--json PATH]

The encoder is T5 v1.1 XXL's (google/t5-v1_1-xxl, the one both pipelines use: width 4096,
feed-forward 10240 gated-GELU, 64 heads, 24 layers; 4.76 B parameters), random weights, built
at its real width with ``--layers`` of its 24 layers; the bytes are also given for all 24
(exact: the same counts per layer), the times pro rata by layers (printed as such). Encoding:
one prompt of ``--tokens`` tokens (FLUX pads to 512, SD3 to 256), best of ``--reps``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import T5Config, T5EncoderModel

from benchmarks import common
from tuneqdm_core.cli.reports import table
from tuneqdm_core.families.flow import quantize_text_encoder
from tuneqdm_core.layers import QuantLayer

XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 32128,
}


def held_bytes(model: torch.nn.Module) -> int:
    """Parameters and buffers: what the encoder keeps on its device."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_bytes(model: Any) -> int:
    """The bytes of the encoder's blocks alone (what grows with the layer count)."""
    return sum(held_bytes(block) for block in model.encoder.block)


def encode_seconds(model: Any, tokens: torch.Tensor, reps: int, device: torch.device) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(reps):
            common.sync(device)
            start = time.perf_counter()
            model(tokens)
            common.sync(device)
            best = min(best, time.perf_counter() - start)
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2, help="of T5-XXL's 24")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"machine: {common.machine()}", flush=True)

    torch.manual_seed(0)
    config = T5Config(**{**XXL, "num_layers": args.layers})
    model = T5EncoderModel(config).eval().requires_grad_(False)
    tokens = torch.randint(0, int(XXL["vocab_size"]), (1, args.tokens), device=device)

    float_bytes, float_layers = held_bytes(model), layer_bytes(model)
    model.to(device)
    float_seconds = encode_seconds(model, tokens, args.reps, device)
    with torch.no_grad():
        reference = model(tokens)[0].float()
    model.cpu()
    # As the loader does it: on the CPU, before the encoder moves to its device.
    start = time.perf_counter()
    quantize_text_encoder(model, 8)
    quantize_seconds = time.perf_counter() - start
    w8_bytes, w8_layers = held_bytes(model), layer_bytes(model)
    model.to(device)
    w8_seconds = encode_seconds(model, tokens, args.reps, device)
    with torch.no_grad():
        error = float((model(tokens)[0].float() - reference).norm() / reference.norm())
    quantized = sum(isinstance(m, QuantLayer) for m in model.modules())

    scale = int(XXL["num_layers"]) / args.layers
    full_float = float_bytes + (scale - 1) * float_layers
    full_w8 = w8_bytes + (scale - 1) * w8_layers
    gib = common.GIB
    rows = [
        [
            f"{args.layers} layers, measured",
            f"{float_bytes / gib:.2f}",
            f"{w8_bytes / gib:.2f}",
            common.ratio(w8_bytes, float_bytes),
            f"{float_seconds:.3f}",
            f"{w8_seconds:.3f}",
            common.ratio(w8_seconds, float_seconds),
            f"{quantize_seconds:.1f}",
        ],
        [
            "24 layers, extrapolated",
            f"{full_float / gib:.2f}",
            f"{full_w8 / gib:.2f}",
            common.ratio(full_w8, full_float),
            f"{float_seconds * scale:.2f}",
            f"{w8_seconds * scale:.2f}",
            common.ratio(w8_seconds, float_seconds),
            f"{quantize_seconds * scale:.1f}",
        ],
    ]
    header = [
        "T5-XXL encoder",
        "fp32 GiB",
        "W8 GiB",
        "× fp32",
        "fp32 encode s",
        "W8 encode s",
        "× fp32",
        "quantize s",
    ]
    print(table(header, rows))
    print(
        f"{quantized} linear layers at 8 bits; embeddings' relative error {error:.2e} "
        f"({args.tokens} tokens, random weights)"
    )
    common.write_json(
        args.json,
        {
            "benchmark": "text_encoder",
            "machine": common.machine(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "float_bytes": float_bytes,
            "w8_bytes": w8_bytes,
            "full_depth_float_bytes": full_float,
            "full_depth_w8_bytes": full_w8,
            "float_encode_s": float_seconds,
            "w8_encode_s": w8_seconds,
            "quantize_s": quantize_seconds,
            "relative_error": error,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
