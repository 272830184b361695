"""Scenes are drawn from a recipe and read back by the measurements (benchmarks/quality.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from tests.core.builtin.data import fashion_dir, needs_fashion
from tuneqdm_core.builtin.scenes import (
    CLASSES,
    COLOURS,
    POSITIONS,
    SIZE,
    DatasetMissingError,
    Scene,
    SceneSampler,
    background_of,
    garment_crop,
    load_fashion,
    position_of,
    render,
    shrink,
)


def _garment(seed: int = 0) -> torch.Tensor:
    """A made-up 16×16 garment: a filled shape with some shading."""
    g = torch.Generator().manual_seed(seed)
    coverage = torch.zeros(SIZE // 2, SIZE // 2)
    coverage[2:14, 4:12] = 0.6 + 0.4 * torch.rand(12, 8, generator=g)
    return coverage


@pytest.mark.parametrize(("colour", "position"), itertools.product(COLOURS, POSITIONS))
def test_background_and_position_read_back(colour: str, position: str) -> None:
    image = render(_garment(), colour, position)
    assert image.shape == (3, SIZE, SIZE) and image.min() >= -1 and image.max() <= 1
    assert background_of(image) == colour
    assert position_of(image) == position


@pytest.mark.parametrize("colour", ["white", "black", "red", "yellow"])
def test_garment_crop_recovers_the_garment_on_any_background(colour: str) -> None:
    garment = _garment(1)
    crop = garment_crop(render(garment, colour, "bottom right", jitter=(1, -1)))
    assert crop.shape == garment.shape
    # All of the garment is inside the crop; centring it by its mass may shift it one pixel.
    assert abs(float(crop.sum() - garment.sum())) < 0.02 * float(garment.sum())
    # Quantisation to the 0..255 palette and back costs about a hundredth.
    errors = [
        float((crop - torch.roll(garment, (dy, dx), (0, 1))).abs().max())
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    assert min(errors) < 0.02


def test_captions_name_what_is_drawn() -> None:
    scene = Scene(CLASSES.index("bag"), "orange", "top left")
    assert scene.caption() == "a photo of a bag on an orange background, top left"
    assert scene.caption(with_colour=False) == "a photo of a bag, top left"
    assert scene.caption(with_position=False) == "a photo of a bag on an orange background"


def test_sampler_is_reproducible_and_its_scenes_match_their_captions() -> None:
    coverage = torch.stack([_garment(i) for i in range(4)])
    labels = torch.tensor([0, 3, 8, 9])
    a = SceneSampler(coverage, labels, seed=3, drop_caption=0.0, drop_part=0.0).batch(12)
    b = SceneSampler(coverage, labels, seed=3, drop_caption=0.0, drop_part=0.0).batch(12)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    for image, caption in zip(*a, strict=True):
        colour = caption.split(" background")[0].split(" ")[-1]
        assert background_of(image) == colour, caption
        assert caption.endswith(position_of(image)), caption


def test_missing_dataset_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetMissingError, match="apt-get install dataset-fashion-mnist"):
        load_fashion("train", tmp_path)


@needs_fashion
def test_fashion_mnist_loads_with_its_ten_classes() -> None:
    images, labels = load_fashion("test", fashion_dir())
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert sorted(labels.unique().tolist()) == list(range(len(CLASSES)))
    small = shrink(images[:5])
    assert small.shape == (5, SIZE // 2, SIZE // 2) and small.min() >= 0 and small.max() <= 1
