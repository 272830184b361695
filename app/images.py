"""Check uploaded photos by their content, downscale them and re-encode them to JPEG.

Decoding untrusted images is the riskiest thing the API does, so the order matters: byte limit
while reading, then the header's pixel count before any decode (decompression bombs), then a full
decode (truncated files), and only then re-encoding. Nothing from the upload is stored verbatim.

The stored copy is what training needs and no more: its short side is at most `max_side`
(TUNEQDM_STORED_PHOTO_SCALE × the largest training resolution; training resizes the short side,
tuneqdm_core.images.to_training_tensor), EXIF rotation applied, as a high-quality JPEG. A JPEG
upload is decoded straight at a reduced scale (libjpeg's DCT scaling), which is most of the CPU
saved on large photos (benchmarks/upload_images.py).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # JPEG
    width: int
    height: int
    # Of the upload as sent: what an Idempotency-Key's fingerprint compares (app/idempotency.py).
    source_sha256: str

    suffix = "jpg"


def read_limited(stream: BinaryIO, limit: int, what: str) -> bytes:
    """Read at most `limit` bytes, stopping as soon as the stream is longer."""
    buf = bytearray()
    while chunk := stream.read(_CHUNK):
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(
                f"{what} is larger than the limit of {limit} bytes; send a smaller file"
            )
    return bytes(buf)


def check_image(
    data: bytes, *, max_pixels: int, what: str, max_side: int | None = None, quality: int = 95
) -> CheckedImage:
    if not data:
        raise InvalidInput(f"{what} is empty; send a PNG, JPEG or WebP photo")
    try:
        with warnings.catch_warnings():
            # Our own pixel check below is the limit; PIL's global one must not only warn.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                fmt = probe.format
                width, height = probe.size
                if fmt not in ALLOWED_FORMATS:
                    raise InvalidInput(f"{what} is a {fmt} image; send PNG, JPEG or WebP instead")
                if width * height > max_pixels:
                    raise InvalidInput(
                        f"{what} has {width}x{height} = {width * height} pixels, above the "
                        f"limit of {max_pixels}; downscale it first"
                    )
                probe.verify()
            ratio = 1.0
            if max_side is not None and min(width, height) > max_side:
                ratio = max_side / min(width, height)
            with Image.open(io.BytesIO(data)) as img:
                if ratio < 1.0:
                    # JPEG only: decode at the smallest 1/2^k scale still at least the target.
                    img.draft("RGB", (math.ceil(width * ratio), math.ceil(height * ratio)))
                img.load()
                # Re-encoding drops EXIF, so apply its rotation now or phone photos train sideways.
                rgb = ImageOps.exif_transpose(img).convert("RGB")
            if max_side is not None and min(rgb.size) > max_side:
                # From the decoded size: draft() and the EXIF rotation may both have changed it.
                scale = max_side / min(rgb.size)
                target = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
                rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    except InvalidInput:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL refuses to even open an image far above its own limit, before our check above
        # sees the size; the message it raises carries the pixel count.
        count = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{count.group(1)} pixels" if count else "more pixels than PIL opens"
        raise InvalidInput(
            f"{what} has {pixels}, above the limit of {max_pixels} pixels; downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise InvalidInput(
            f"{what} is not a readable PNG, JPEG or WebP image (whatever its file name says)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt data as OSError/SyntaxError from verify() or load().
        raise InvalidInput(
            f"{what} could not be decoded ({exc}); the file may be truncated or corrupt"
        ) from None
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality, optimize=True)
    return CheckedImage(
        data=out.getvalue(),
        width=rgb.width,
        height=rgb.height,
        source_sha256=hashlib.sha256(data).hexdigest(),
    )
