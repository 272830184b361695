"""Subject photos in, training tensors out; generated tensors out as PIL images."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Image.Image | str | os.PathLike[str]


class ImageError(ValueError):
    """An input image that cannot be used, with the reason a user can act on."""


def open_image(source: ImageSource) -> Image.Image:
    """An RGB image with its EXIF orientation applied (phones store portraits rotated)."""
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
            raise ImageError(f"{path}: not a readable image ({error})") from error
    return ImageOps.exif_transpose(image).convert("RGB")


def training_crop(size: tuple[int, int], resolution: int) -> tuple[tuple[int, int], int, int]:
    """For an image of ``size`` (w, h): its size after resizing the short side to
    ``resolution`` and the (left, top) corner of the centered square crop in it."""
    width, height = size
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return resized, (resized[0] - resolution) // 2, (resized[1] - resolution) // 2


def to_training_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """Resize the short side to ``resolution``, center-crop a square, scale to [-1, 1] CHW."""
    size, left, top = training_crop(image.size, resolution)
    image = image.resize(size, Image.Resampling.BICUBIC)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_subject_images(sources: Sequence[ImageSource], resolution: int) -> torch.Tensor:
    """``[N, 3, resolution, resolution]`` in [-1, 1]."""
    if not sources:
        raise ImageError("no subject images given; pass 3-20 photos of the subject")
    return torch.stack([to_training_tensor(open_image(s), resolution) for s in sources])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` in [-1, 1] → RGB PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]
