from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from tuneqdm_core.images import ImageError, load_subject_images, open_image, to_pil


def test_exif_orientation_is_honoured(tmp_path: Path) -> None:
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": a phone portrait
    path = tmp_path / "portrait.jpg"
    image.save(path, exif=exif)
    assert open_image(path).size == (20, 60)


def test_any_size_and_mode_becomes_a_square_rgb_tensor(tmp_path: Path) -> None:
    paths = []
    for i, (mode, size) in enumerate([("L", (300, 90)), ("RGBA", (17, 40)), ("P", (64, 64))]):
        path = tmp_path / f"{i}.png"
        Image.new(mode, size).save(path)
        paths.append(path)
    batch = load_subject_images(paths, 32)
    assert batch.shape == (3, 3, 32, 32)
    assert batch.min() >= -1 and batch.max() <= 1
    assert [im.size for im in to_pil(batch)] == [(32, 32)] * 3


def test_unreadable_images_are_named(tmp_path: Path) -> None:
    fake = tmp_path / "dog.jpg"
    fake.write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageError, match=r"dog\.jpg: not a readable image"):
        open_image(fake)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buffer, format="PNG")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    with pytest.raises(ImageError, match=r"cut\.png"):
        open_image(truncated)
    with pytest.raises(ImageError, match="no such image file"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="no subject images"):
        load_subject_images([], 32)
