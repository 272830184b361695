"""Captioned scenes made from Fashion-MNIST, and the measurements that read them back.

A scene is one garment (a 28×28 Fashion-MNIST image shrunk to half the canvas) on a flat
background colour at one of five positions, captioned "a photo of a bag on a red background,
top left". Because every scene is drawn from a known recipe, a generated image can be scored by
reading the recipe back: the background colour (border pixels), the position (where the
garment's pixels are) and the garment itself (its pixels with the background taken out). This
is what gives the built-in model's images a meaning that can be measured offline.
"""

from __future__ import annotations

import gzip
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
# Fashion-MNIST's labels 0-9, each one word the model's tokenizer knows.
CLASSES = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 50),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "purple": (130, 50, 160),
    "orange": (240, 140, 30),
    "gray": (128, 128, 128),
    "pink": (240, 150, 190),
}
# Centre of the garment as fractions of the canvas.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
SIZE = 32  # canvas pixels; the garment takes half of each side


class DatasetMissingError(FileNotFoundError):
    """Fashion-MNIST is not installed where it was looked for."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion(
    split: str = "train", data_dir: Path = DATA_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, 28, 28] uint8, labels [N] int64)`` of ``split`` ("train": 60k, "test": 10k)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = Path(data_dir) / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.is_file():
        raise DatasetMissingError(
            f"{images_path} not found: install Debian's dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist) or pass its folder"
        )
    images = _read_idx(images_path)
    labels = _read_idx(Path(data_dir) / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def shrink(images: torch.Tensor, size: int = SIZE // 2) -> torch.Tensor:
    """``[N, 28, 28]`` uint8 → ``[N, size, size]`` float coverage in [0, 1] (antialiased)."""
    x = images.float().unsqueeze(1) / 255.0
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True).squeeze(1)


def ink_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """The garment's colour: dark on light backgrounds, light on dark ones, so it always shows."""
    r, g, b = background
    return (15, 15, 15) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (245, 245, 245)


# The palette and its inks as [10, 3] tensors, in the order of COLOURS.
PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
INKS = torch.tensor([ink_colour(c) for c in COLOURS.values()], dtype=torch.float32)


@dataclass(frozen=True)
class Scene:
    garment: int  # class index
    colour: str
    position: str

    def caption(self, with_colour: bool = True, with_position: bool = True) -> str:
        text = f"a photo of a {CLASSES[self.garment]}"
        if with_colour:
            article = "an" if self.colour[0] in "aeiou" else "a"
            text += f" on {article} {self.colour} background"
        if with_position:
            text += f", {self.position}"
        return text


def _corner(position: str, side: int, jitter: tuple[int, int]) -> tuple[int, int]:
    """Left and top pixel of a ``side``-pixel garment centred on ``position``."""
    cx, cy = POSITIONS[position]
    left = min(max(round(cx * SIZE - side / 2) + jitter[0], 0), SIZE - side)
    top = min(max(round(cy * SIZE - side / 2) + jitter[1], 0), SIZE - side)
    return left, top


def render(
    coverage: torch.Tensor, colour: str, position: str, jitter: tuple[int, int] = (0, 0)
) -> torch.Tensor:
    """One scene ``[3, SIZE, SIZE]`` in [-1, 1] from a garment's ``[s, s]`` coverage."""
    background = torch.tensor(COLOURS[colour], dtype=torch.float32).view(3, 1, 1)
    ink = torch.tensor(ink_colour(COLOURS[colour]), dtype=torch.float32).view(3, 1, 1)
    side = coverage.shape[-1]
    left, top = _corner(position, side, jitter)
    alpha = torch.zeros(1, SIZE, SIZE)
    alpha[0, top : top + side, left : left + side] = coverage
    pixels = background * (1 - alpha) + ink * alpha
    return pixels / 127.5 - 1.0


class SceneSampler:
    """Random captioned scenes for pretraining. Captions leave out the colour or the position
    now and then (so "a photo of a bag" alone means something) and are sometimes empty (for
    classifier-free guidance)."""

    def __init__(
        self,
        coverage: torch.Tensor,
        labels: torch.Tensor,
        seed: int = 0,
        drop_caption: float = 0.1,
        drop_part: float = 0.2,
    ) -> None:
        # numpy for the per-sample slicing: torch's indexing overhead dominated the batch.
        self.coverage, self.labels = coverage.numpy(), labels
        self.rng = random.Random(seed)
        self.drop_caption, self.drop_part = drop_caption, drop_part

    def batch(self, size: int) -> tuple[torch.Tensor, list[str]]:
        side = self.coverage.shape[-1]
        alpha = np.zeros((size, SIZE, SIZE), dtype=np.float32)
        colour_ids, captions = [], []
        for b in range(size):
            i = self.rng.randrange(len(self.labels))
            colour = self.rng.randrange(len(COLOURS))
            position = self.rng.choice(list(POSITIONS))
            garment = self.coverage[i, :, ::-1] if self.rng.random() < 0.5 else self.coverage[i]
            left, top = _corner(position, side, (self.rng.randint(-1, 1), self.rng.randint(-1, 1)))
            alpha[b, top : top + side, left : left + side] = garment
            colour_ids.append(colour)
            scene = Scene(int(self.labels[i]), list(COLOURS)[colour], position)
            if self.rng.random() < self.drop_caption:
                captions.append("")
            else:
                captions.append(
                    scene.caption(
                        self.rng.random() >= self.drop_part, self.rng.random() >= self.drop_part
                    )
                )
        ids = torch.tensor(colour_ids)
        a = torch.from_numpy(alpha).unsqueeze(1)
        pixels = PALETTE[ids].view(-1, 3, 1, 1) * (1 - a) + INKS[ids].view(-1, 3, 1, 1) * a
        return pixels / 127.5 - 1.0, captions


# Reading scenes back -----------------------------------------------------------------------


def _as_array(image: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` in [-1, 1] → float RGB in [0, 255]."""
    return (image.float().clamp(-1, 1) + 1) * 127.5


def _background_index(rgb: torch.Tensor) -> int:
    """Index in :data:`PALETTE` of the colour nearest the median of the outermost ring."""
    ring = torch.cat([rgb[:, 0, :], rgb[:, -1, :], rgb[:, :, 0], rgb[:, :, -1]], dim=1)
    median = ring.median(dim=1).values
    return int((PALETTE - median).norm(dim=1).argmin())


def background_of(image: torch.Tensor) -> str:
    """The palette colour nearest the median of the outermost ring of pixels."""
    return list(COLOURS)[_background_index(_as_array(image))]


def coverage_of(image: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` in [0, 1]: how far each pixel is from the background towards the ink colour
    (the inverse of :func:`render`), so the garment can be compared on any background."""
    rgb = _as_array(image)
    index = _background_index(rgb)
    background = PALETTE[index].view(3, 1, 1)
    direction = INKS[index].view(3, 1, 1) - background
    alpha = ((rgb - background) * direction).sum(0) / direction.pow(2).sum()
    return alpha.clamp(0, 1)


def _centre(alpha: torch.Tensor) -> tuple[float, float]:
    """``(row, column)`` of the centre of mass of a coverage map, in pixels."""
    h, w = alpha.shape
    total = alpha.sum().clamp_min(1e-6)
    cy = float((alpha * torch.arange(h).view(h, 1)).sum() / total)
    cx = float((alpha * torch.arange(w).view(1, w)).sum() / total)
    return cy, cx


def position_of(image: torch.Tensor) -> str:
    """The named position nearest the garment's centre of mass."""
    alpha = coverage_of(image)
    cy, cx = _centre(alpha)
    cy, cx = cy / (alpha.shape[0] - 1), cx / (alpha.shape[1] - 1)
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def garment_crop(image: torch.Tensor, side: int = SIZE // 2) -> torch.Tensor:
    """``[side', side']`` coverage around the garment's centre of mass (the crop that subject
    fidelity compares; background and position taken out)."""
    alpha = coverage_of(image)
    h, w = alpha.shape
    side = min(side * h // SIZE, h)
    cy, cx = _centre(alpha)
    top = min(max(round(cy - side / 2), 0), h - side)
    left = min(max(round(cx - side / 2), 0), w - side)
    return alpha[top : top + side, left : left + side]
