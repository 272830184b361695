"""The ``tuneqdm`` command as a new user meets it: a bad photo fails before the base is loaded,
bases are cached by default, written files are readable by others (0644), and no library
notices that do not concern the user are printed."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.core.helpers import perturbed_adapter
from tuneqdm_core import AdapterConfig, QuantConfig, quantize_, save_adapter
from tuneqdm_core.cli import main
from tuneqdm_core.cli.models import CACHE_ENV
from tuneqdm_core.configs import build_unet


def test_a_bad_photo_fails_before_the_base_is_loaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"not an image at all")
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    result = subprocess.run(
        [
            *(sys.executable, "-m", "tuneqdm_core.cli", "finetune", str(tiny_model_dir)),
            *("--images", str(bad), "--prompt", "a photo of sks bag"),
            *("--out", str(tmp_path / "a.safetensors"), "--cache-dir", str(cache)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 2, result
    assert f"{bad}: not a readable image" in result.stderr
    # Nothing was loaded or quantized: no "base … quantized now" line, no cache entry.
    assert "base " not in result.stdout and not cache.exists()
    # Only the error: transformers' notices about torchvision (not installed, not used) are
    # not printed.
    assert "torchvision" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"tuneqdm finetune: error: {bad}: not a readable image "
        + result.stderr.split("not a readable image ", 1)[1].strip()
    ]


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_written_files_are_readable_by_others(tmp_path: Path, umask_022: None) -> None:
    unet = build_unet("tiny-sd1")
    quantize_(unet, QuantConfig(bits=4))
    path = save_adapter(perturbed_adapter(unet, AdapterConfig()), tmp_path / "a.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_bases_are_cached_by_default(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "default-cache"))
    assert main(["quantize", str(tiny_model_dir)]) == 0
    assert "(quantized now)" in capsys.readouterr().out
    assert (tmp_path / "default-cache").is_dir()
    assert main(["quantize", str(tiny_model_dir)]) == 0
    assert "(from cache)" in capsys.readouterr().out
    # --no-cache quantizes afresh and keeps nothing.
    assert main(["quantize", str(tiny_model_dir), "--no-cache"]) == 0
    assert "(quantized now)" in capsys.readouterr().out
