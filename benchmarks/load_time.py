"""Loading a base model: first start (float load + quantization + cache write) vs a restart
from the quantized cache, each in a fresh process, side by side.

    python benchmarks/load_time.py [--arch sd1] [--bits 4] [--device cpu] [--json out.json]

The model folder holds the chosen UNet architecture with random weights beside the tiny VAE
and text encoder (`tuneqdm build-tiny --arch sd1`), so the UNet — what is quantized and
cached — is full size. Peak RSS is the child process's own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, sys, time
start = time.perf_counter()

def peak_rss_gib():
    # VmHWM, not ru_maxrss: ru_maxrss survives execve and would report the parent's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20

import torch
from tuneqdm_core.base import load_base
from tuneqdm_core.model import QuantConfig
imported = time.perf_counter()
base = load_base(sys.argv[1], quant=QuantConfig(bits=int(sys.argv[3])), cache_dir=sys.argv[2],
                 device=sys.argv[4])
if sys.argv[4].startswith("cuda"):
    torch.cuda.synchronize()
print(json.dumps({"from_cache": base.from_cache, "load_s": base.load_seconds,
                  "import_s": imported - start, "total_s": time.perf_counter() - start,
                  "peak_rss_gib": peak_rss_gib()}))
"""


def run_child(model: Path, cache: Path, bits: int, device: str) -> dict[str, float]:
    # Passive OpenMP waits: spinning threads on a shared 2-core machine slowed runs tenfold.
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(model), str(cache), str(bits), device],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="sd1", choices=["tiny-sd1", "tiny-sd2", "sd1", "sd2"])
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="write the numbers to this file")
    args = parser.parse_args()
    from tuneqdm_core.builtin.tiny import save_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        model, cache = Path(tmp) / "model", Path(tmp) / "cache"
        start = time.perf_counter()
        save_tiny_pipeline(model, arch=args.arch)
        print(f"built {args.arch} model folder in {time.perf_counter() - start:.1f} s")
        first = run_child(model, cache, args.bits, args.device)
        again = run_child(model, cache, args.bits, args.device)
    print(f"\nload_base, UNet {args.arch} W{args.bits}, device {args.device}, fresh process each")
    print(f"{'start':<12}{'load s':>8}{'process s':>11}{'peak RSS GiB':>14}")
    for name, row in (("first", first), ("from cache", again)):
        print(f"{name:<12}{row['load_s']:>8.2f}{row['total_s']:>11.2f}{row['peak_rss_gib']:>14.2f}")
    print(f"\ncached / first load time: {again['load_s'] / first['load_s']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"first": first, "cached": again}, indent=2))


if __name__ == "__main__":
    main()
