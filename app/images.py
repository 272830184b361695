"""Check uploaded photos by their content and re-encode them to PNG.

Decoding untrusted images is the riskiest thing the API does, so the order matters: byte limit
while reading, then the header's pixel count before any decode (decompression bombs), then a full
decode (truncated files), and only then re-encoding. Nothing from the upload is stored verbatim.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidInput, PayloadTooLarge

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class CheckedImage:
    png: bytes
    width: int
    height: int


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


def check_image(data: bytes, *, max_pixels: int, what: str) -> CheckedImage:
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
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                # Re-encoding drops EXIF, so apply its rotation now or phone photos train sideways.
                rgb = ImageOps.exif_transpose(img).convert("RGB")
    except InvalidInput:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInput(
            f"{what} is not a readable PNG, JPEG or WebP image (whatever its file name says)"
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        # PIL reports truncated or corrupt data as OSError/SyntaxError from verify() or load().
        raise InvalidInput(
            f"{what} could not be decoded ({exc}); the file may be truncated or corrupt"
        ) from None
    out = io.BytesIO()
    rgb.save(out, format="PNG")
    return CheckedImage(png=out.getvalue(), width=rgb.width, height=rgb.height)
