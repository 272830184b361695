"""Storing an uploaded photo: the old pipeline (full-size decode, PNG) vs the current one
(JPEG decoded at a reduced DCT scale, short side capped at 2 × the largest training resolution,
high-quality JPEG), side by side: stored bytes and CPU seconds per photo.

    python benchmarks/upload_images.py [--side 4096] [--repeat 3] [--json out.json]

The photo is synthetic but photo-like (smooth gradients, edges and sensor noise), saved as a
quality-90 JPEG the way a phone would; a flat or pure-noise image would flatter or punish the
encoders unrealistically. CPU time is the process's own (time.process_time), best of --repeat.
"""

from __future__ import annotations

import argparse
import io
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from app.images import check_image
from app.services.finetunes import stored_side
from app.settings import Settings


def photo_like(side: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    r = 128 + 100 * np.sin(3 * x + 2 * y)
    g = 128 + 90 * np.cos(4 * y - x)
    b = 128 + 80 * np.sin(5 * x * y + 1)
    image = np.stack([r, g, b], axis=-1)
    # A few hard-edged shapes, then sensor noise.
    for _ in range(12):
        cx, cy = rng.uniform(0, 1, 2).tolist()
        rad = rng.uniform(0.03, 0.15)
        mask = (x - cx) ** 2 + (y - cy) ** 2 < rad**2
        image[mask] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 6, image.shape)
    out = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def before(data: bytes) -> bytes:
    """The previous app.images.check_image: verify, full decode, EXIF, PNG of the full size."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as probe:
            probe.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return out.getvalue()


def after(data: bytes, settings: Settings, native: int) -> bytes:
    return check_image(
        data,
        max_pixels=settings.max_image_pixels,
        what="photo",
        max_side=stored_side(native, settings),
        quality=settings.stored_photo_quality,
    ).data


def measure(fn: Callable[[], bytes], repeat: int) -> tuple[int, float, tuple[int, int]]:
    best = float("inf")
    stored = b""
    for _ in range(repeat):
        start = time.process_time()
        stored = fn()
        best = min(best, time.process_time() - start)
    with Image.open(io.BytesIO(stored)) as img:
        size = img.size
    return len(stored), best, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--native", type=int, default=512, help="the base's native size (px)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    settings = Settings()
    data = photo_like(args.side)
    rows = {
        "before (PNG, full size)": measure(lambda: before(data), args.repeat),
        "after (JPEG, downscaled)": measure(
            lambda: after(data, settings, args.native), args.repeat
        ),
    }
    print(f"upload: {args.side}x{args.side} JPEG, {len(data) / 2**20:.2f} MiB")
    print(f"{'pipeline':<28} {'stored':>12} {'stored MiB':>11} {'CPU s':>8}")
    for name, (nbytes, cpu, size) in rows.items():
        shape = f"{size[0]}x{size[1]}"
        print(f"{name:<28} {shape:>12} {nbytes / 2**20:>11.2f} {cpu:>8.3f}")
    (b_bytes, b_cpu, _), (a_bytes, a_cpu, _) = rows.values()
    print(f"{'after / before':<28} {'':>12} {a_bytes / b_bytes:>11.3f} {a_cpu / b_cpu:>8.3f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "upload_bytes": len(data),
                    "side": args.side,
                    "rows": {
                        k: {"bytes": v[0], "cpu_s": v[1], "size": list(v[2])}
                        for k, v in rows.items()
                    },
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
