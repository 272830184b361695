"""Min-max vs per-channel MSE range search: weight SQNR and time, side by side in one run.

    python benchmarks/quant_range.py [--rows 320] [--cols 2880] [--json out.json]

Weights: PyTorch's default init (uniform, what the random SD benchmarks use), Gaussian,
Laplace and Student-t(4) — trained diffusion weights are bell-shaped with heavy tails, so the
last three are the ones that predict real checkpoints. Also one real-shaped layer of the SD 1.x
UNet (1280 × 2560·3·3) for time per million weights.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from tuneqdm_core import quant


def distributions(rows: int, cols: int) -> dict[str, torch.Tensor]:
    bound = 1 / cols**0.5
    return {
        "uniform (torch init)": (torch.rand(rows, cols) * 2 - 1) * bound,
        "gaussian": torch.randn(rows, cols),
        "laplace": torch.distributions.Laplace(0.0, 1.0).sample((rows, cols)),
        "student-t(4)": torch.distributions.StudentT(4.0).sample((rows, cols)),
    }


def sqnr(w: torch.Tensor, bits: int, method: quant.RangeMethod) -> tuple[float, float]:
    start = time.perf_counter()
    scale, zero = quant.choose_qparams(w, bits, method)
    seconds = time.perf_counter() - start
    return quant.sqnr_db(w, quant.fake_quantize(w, scale, zero, bits)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--cols", type=int, default=2880)
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    print(f"{'weights':22} {'bits':>4} {'minmax dB':>10} {'mse dB':>8} {'gain dB':>8}")
    for name, w in distributions(args.rows, args.cols).items():
        for bits in (4, 8):
            minmax, _ = sqnr(w, bits, "minmax")
            mse, _ = sqnr(w, bits, "mse")
            results.append({"weights": name, "bits": bits, "minmax_db": minmax, "mse_db": mse})
            print(f"{name:22} {bits:>4} {minmax:>10.2f} {mse:>8.2f} {mse - minmax:>8.2f}")
    layer = torch.randn(1280, 2560 * 9)
    millions = layer.numel() / 1e6
    timing = {method: sqnr(layer, 4, method)[1] / millions for method in ("minmax", "mse")}
    print(
        f"\ntime per million weights (1280x23040 layer): minmax {timing['minmax'] * 1e3:.1f} ms, "
        f"mse {timing['mse'] * 1e3:.1f} ms ({timing['mse'] / timing['minmax']:.0f}x); "
        f"SD 1.x UNet (859.5 M weights) at mse ≈ {timing['mse'] * 859.5:.0f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"sqnr": results, "s_per_mweight": timing}, indent=2))


if __name__ == "__main__":
    main()
