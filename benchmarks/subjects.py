"""The subjects of the personalization benchmarks (benchmarks/quality.py, export_rank.py,
before_after.py): Fashion-MNIST test garments the built-in models never saw, each the most
atypical of its class, rendered in a set of photos (other backgrounds and positions than the
prompts ask for) and given its own token; and the new contexts the prompts put them in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from tuneqdm_core.builtin.scenes import CLASSES, DATA_DIR, Scene, load_fashion, render, shrink

DEFAULT_MODEL = common.REPO_ROOT / "models" / "fashion-sd"
# The subject's photos, by set. "distinct" shares no colour and no (colour, position) pair with
# the new contexts; "varied" shares the colours but no pair.
PHOTO_SETS = {
    "distinct": [
        ("gray", "top left"),
        ("white", "bottom right"),
        ("black", "center"),
        ("pink", "top right"),
        ("orange", "bottom left"),
    ],
    "varied": [
        ("red", "bottom left"),
        ("blue", "center"),
        ("yellow", "top left"),
        ("green", "top right"),
    ],
}
NEW_CONTEXTS = [
    ("red", "top right"),
    ("blue", "top left"),
    ("yellow", "bottom right"),
    ("green", "center"),
    ("purple", "bottom left"),
]
SUBJECT_CLASSES = ("bag", "sneaker", "dress", "boot", "pullover", "sandal")
TOKENS = ("sks", "zwx", "qrt")


@dataclass(frozen=True)
class SubjectItem:
    name: str  # e.g. "bag"
    token: str
    photos: list[torch.Tensor]  # [3, SIZE, SIZE] in [-1, 1]
    photo_set: str = "distinct"

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.name}"

    def prompt(self, colour: str, position: str, with_token: bool = True) -> str:
        scene = Scene(CLASSES.index(self.name), colour, position).caption()
        return scene.replace("a photo of a ", f"a photo of {self.token} ") if with_token else scene


def pick_subjects(
    count: int, data_dir: Path = DATA_DIR, photo_set: str = "distinct"
) -> list[SubjectItem]:
    """The test garment of each class farthest from its class's mean training garment, in the
    photos of ``photo_set``."""
    train_images, train_labels = load_fashion("train", data_dir)
    test_images, test_labels = load_fashion("test", data_dir)
    train, test = shrink(train_images), shrink(test_images)
    subjects = []
    for i, name in enumerate(SUBJECT_CLASSES[:count]):
        label = CLASSES.index(name)
        mean = train[train_labels == label].mean(0)
        candidates = test[test_labels == label]
        distance = (candidates - mean).flatten(1).norm(dim=1)
        garment = candidates[int(distance.argmax())]
        photos = [render(garment, colour, where) for colour, where in PHOTO_SETS[photo_set]]
        subjects.append(SubjectItem(name, TOKENS[i % len(TOKENS)], photos, photo_set))
    return subjects
