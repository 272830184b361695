"""``tuneqdm sizes``, ``tuneqdm inspect`` and ``tuneqdm demo``: reports on the core itself."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tuneqdm_core import sizes
from tuneqdm_core.adapter import Adapter, AdapterConfig, param_groups
from tuneqdm_core.configs import build_unet, example_inputs
from tuneqdm_core.model import QuantConfig, quantize_
from tuneqdm_core.routing import ScaleBank, route_adapters, routed
from tuneqdm_core.serialization import load_adapter, read_metadata, save_adapter


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_sizes(args: argparse.Namespace) -> int:
    """Quantize the architecture (random weights) at each bit width and report real bytes."""
    report: dict[str, Any] = {"arch": args.arch, "range": args.range, "models": [], "adapters": []}
    for bits in args.bits:
        start = time.perf_counter()
        unet = build_unet(args.arch, seed=0)
        fp32 = sizes.float_bytes(unet)
        quantize_(unet, QuantConfig(bits=bits, range=args.range))
        seconds = time.perf_counter() - start
        model_bytes = sizes.quantized_bytes(unet)
        report["models"].append(
            {
                "bits": bits,
                **asdict(model_bytes),
                "total": model_bytes.total,
                "fp32": fp32,
                "seconds": seconds,
            }
        )
        if bits == args.bits[-1]:
            for method, intervals in [("peqa", 1), *(("tuneqdm", n) for n in args.intervals)]:
                config = AdapterConfig(method=method, intervals=intervals)  # type: ignore[arg-type]
                report["adapters"].append(
                    {
                        "method": method,
                        "intervals": intervals,
                        "values": Adapter.create(unet, config).num_values(),
                        "file_bytes": sizes.adapter_file_bytes(unet, config),
                    }
                )
        del unet
    print(f"Quantized UNet, architecture {args.arch!r} (random weights), range {args.range!r}")
    print(
        table(
            [
                "bits",
                "codes GiB",
                "s0+z MB",
                "bias MB",
                "other MB",
                "total GiB",
                "fp32 GiB",
                "ratio",
                "build+quantize s",
            ],
            [
                [
                    f"W{m['bits']}",
                    f"{m['codes'] / sizes.GIB:.3f}",
                    f"{m['per_channel'] / sizes.MB:.2f}",
                    f"{m['biases'] / sizes.MB:.2f}",
                    f"{m['other'] / sizes.MB:.2f}",
                    f"{m['total'] / sizes.GIB:.3f}",
                    f"{m['fp32'] / sizes.GIB:.3f}",
                    f"{m['total'] / m['fp32']:.3f}",
                    f"{m['seconds']:.0f}",
                ]
                for m in report["models"]
            ],
        )
    )
    print("\nAdapter files (safetensors, float32 scales + JSON metadata)")
    print(
        table(
            ["method", "intervals", "values", "file MB"],
            [
                [
                    a["method"],
                    a["intervals"],
                    f"{a['values']:,}",
                    f"{a['file_bytes'] / sizes.MB:.2f}",
                ]
                for a in report["adapters"]
            ],
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    metadata = read_metadata(args.path)
    layers = metadata.pop("layers")
    metadata["base_fingerprint"] = metadata["base_fingerprint"][:16] + "…"
    convs = sum(1 for layer in layers if layer[1] == "conv2d")
    metadata["layers"] = f"{len(layers)} ({convs} conv2d)"
    metadata["file_bytes"] = Path(args.path).stat().st_size
    print(json.dumps(metadata, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Quantize a tiny UNet, train a 2-interval adapter on a toy target, save, load, swap."""
    torch.manual_seed(0)
    unet = build_unet("tiny-sd1")
    quantize_(unet, QuantConfig(bits=4))
    print(f"tiny UNet quantized to 4 bits: {sizes.quantized_bytes(unet).total / 1e6:.2f} MB")
    adapter = Adapter.create(unet, AdapterConfig(method="tuneqdm", intervals=2))
    optimizer = torch.optim.AdamW(param_groups(adapter, lr_s_out=1e-3, lr_s_in=1e-2))
    batch = example_inputs(unet, 4, torch.zeros(4))
    target = torch.randn_like(batch["sample"])
    for step in range(args.steps):
        timesteps = torch.randint(0, 1000, (4,))
        with routed(unet, route_adapters([adapter], timesteps)):
            out = unet(**{**batch, "timestep": timesteps}).sample
            loss = torch.nn.functional.mse_loss(out, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    with tempfile.TemporaryDirectory() as directory:
        path = save_adapter(adapter, Path(directory) / "demo.safetensors")
        loaded = load_adapter(path, unet)
        print(f"adapter file: {path.stat().st_size / 1e3:.1f} kB, {adapter.num_values():,} values")
    bank = ScaleBank(unet, slots=2)
    start = time.perf_counter()
    bank.load(1, loaded)
    print(f"adapter swapped into a serving slot in {(time.perf_counter() - start) * 1e3:.3f} ms")
    route = bank.route(torch.tensor([100, 900]), torch.tensor([0, 1]))
    with torch.no_grad(), routed(unet, route):
        unet(**example_inputs(unet, 2, torch.tensor([100, 900])))
    print("one batch served the base model (slot 0) and the adapter (slot 1) together")
    return 0
