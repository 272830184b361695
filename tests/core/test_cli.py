"""The installed ``tuneqdm`` command, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from tests.conftest import subject_photos
from tests.core.helpers import perturbed_adapter
from tuneqdm_core import AdapterConfig, QuantConfig, quantize_, save_adapter
from tuneqdm_core.cli import main
from tuneqdm_core.configs import build_unet


def _tuneqdm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuneqdm_core.cli", *args],
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_sizes_reports_real_bytes_for_a_small_architecture(tmp_path: Path) -> None:
    out = tmp_path / "sizes.json"
    result = _tuneqdm("sizes", "--arch", "tiny-sd1", "--bits", "4", "8", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "W4" in result.stdout and "tuneqdm" in result.stdout
    report = json.loads(out.read_text())
    w4, w8 = report["models"]
    weights = sum(
        p.numel()
        for m in build_unet("tiny-sd1").modules()
        if isinstance(m, nn.Linear | nn.Conv2d)
        for p in [m.weight]
    )
    assert w8["codes"] == weights  # one byte a weight
    assert w4["codes"] < weights / 2 + 1000  # two a byte (+ padding of odd rows)
    assert [(a["method"], a["intervals"]) for a in report["adapters"]] == [
        ("peqa", 1),
        ("tuneqdm", 1),
        ("tuneqdm", 2),
        ("tuneqdm", 4),
    ]
    tuneqdm = {a["intervals"]: a for a in report["adapters"] if a["method"] == "tuneqdm"}
    assert tuneqdm[4]["values"] == 4 * tuneqdm[1]["values"]
    assert tuneqdm[1]["file_bytes"] > 4 * tuneqdm[1]["values"]  # float32 values + header


def test_inspect_prints_metadata_and_refuses_junk(tmp_path: Path) -> None:
    unet = build_unet("tiny-sd1")
    quantize_(unet, QuantConfig(bits=8))
    path = save_adapter(perturbed_adapter(unet, AdapterConfig()), tmp_path / "a.safetensors")
    result = _tuneqdm("inspect", str(path))
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["method"] == "tuneqdm" and shown["bits"] == 8 and shown["intervals"] == 2
    assert shown["file_bytes"] == path.stat().st_size
    junk = tmp_path / "photo.jpg"
    junk.write_bytes(b"\xff\xd8 not an adapter")
    bad = _tuneqdm("inspect", str(junk))
    assert bad.returncode == 2 and "not a readable safetensors file" in bad.stderr
    missing = _tuneqdm("inspect", str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 2 and "nope.safetensors" in missing.stderr


def test_demo_runs() -> None:
    result = _tuneqdm("demo", "--steps", "3")
    assert result.returncode == 0, result.stderr
    assert "swapped into a serving slot" in result.stdout


def test_model_commands_end_to_end_and_their_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """build-tiny → quantize → finetune → generate → inspect, in process, as a user types them."""
    model, cache = str(tmp_path / "tiny"), str(tmp_path / "cache")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, photo in enumerate(subject_photos(3)):
        photo.save(photos / f"{i}.jpg")
    adapter = str(tmp_path / "dog.safetensors")
    assert main(["build-tiny", model]) == 0
    assert main(["quantize", model, "--cache-dir", cache]) == 0
    assert "quantized now" in capsys.readouterr().out
    common = ["--cache-dir", cache, "--resolution", "32", "--steps", "2"]
    assert (
        main(
            [
                "finetune",
                model,
                "--images",
                str(photos),
                "--prompt",
                "a photo of sks dog",
                "--out",
                adapter,
                *common,
            ]
        )
        == 0
    )
    assert "from cache" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                model,
                "--adapter",
                adapter,
                "--prompt",
                "a photo of sks dog",
                "--width",
                "32",
                "--height",
                "32",
                "--steps",
                "2",
                "--num-images",
                "2",
                "--seed",
                "5",
                "--cache-dir",
                cache,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["5.png", "6.png"]
    assert main(["inspect", adapter]) == 0
    capsys.readouterr()

    # Errors a user makes: each exits 2 with a message naming the problem.
    (photos / "notes.jpg").write_text("not a photo")
    assert (
        main(
            [
                "finetune",
                model,
                "--images",
                str(photos / "notes.jpg"),
                "--prompt",
                "a sks dog",
                "--out",
                adapter,
                *common,
            ]
        )
        == 2
    )
    assert "notes.jpg: not a readable image" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)]) == 2
    assert "neither a local model folder" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                model,
                "--bits",
                "8",
                "--adapter",
                adapter,
                "--prompt",
                "x",
                "--cache-dir",
                cache,
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "4-bit base, model is 8-bit" in capsys.readouterr().err
