"""benchmarks/quality.py on a minimal setting: every kind of variant runs and is scored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import export_rank, quality
from benchmarks.fidelity import FeatureNet, prompt_fidelity, self_similarity, subject_fidelity
from tests.core.builtin.data import fashion_dir, needs_fashion
from tuneqdm_core.builtin.scenes import render


@pytest.fixture(scope="module")
def net() -> FeatureNet:
    return FeatureNet()


def _garment(offset: int) -> torch.Tensor:
    coverage = torch.zeros(16, 16)
    coverage[2:14, 3 + offset : 9 + offset] = 1.0
    coverage[6:10, :] = 0.7
    return coverage


def test_subject_fidelity_is_about_the_garment_not_the_scene(net: FeatureNet) -> None:
    photos = [render(_garment(0), "white", "top left"), render(_garment(0), "black", "center")]
    same_elsewhere = render(_garment(0), "red", "bottom right")
    other = render(torch.eye(16).flip(0).clamp(0, 1), "red", "bottom right")
    same, different = subject_fidelity(net, [same_elsewhere, other], photos)
    assert same > 0.9 and different < same - 0.1
    assert self_similarity(net, photos) > 0.9


def test_prompt_fidelity_reads_colour_and_position() -> None:
    images = [render(_garment(0), "blue", "top right"), render(_garment(0), "green", "center")]
    background, position = prompt_fidelity(images, ["blue", "red"], ["top right", "top right"])
    assert background == [1.0, 0.0] and position == [1.0, 0.0]


@needs_fashion
def test_quality_benchmark_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "quality.json"
    variants = ["full", "peqa-w4", "tuneqdm-w8-i2"]
    args = ["--data-dir", str(fashion_dir()), "--subjects", "1", "--seeds", "0", "1"]
    args += ["--steps", "2", "--class-images", "1", "--contexts", "1", "--images", "1"]
    args += ["--sample-steps", "2", "--variants", *variants, "--json", str(out)]
    assert quality.main(args) == 0
    report = json.loads(out.read_text())
    assert report["subjects"] == ["bag"]
    assert set(report["results"]) == set(variants)
    for by_seed in report["results"].values():
        assert set(by_seed) == {"0", "1"}
        for run in [r for runs in by_seed.values() for r in runs]:
            assert -1 <= run["subject"] <= 1 and math.isfinite(run["subject"])
            assert run["background"] in (0.0, 1.0) and run["position"] in (0.0, 1.0)
    assert set(report["references"]) == {
        "subject photos",
        "base W8, class prompt",
        "base W4, class prompt",
    }
    table = capsys.readouterr().out
    for name in [*variants, "subject photos"]:
        assert name in table
    assert "±" in table
    # The same table again from the JSON (how runs split over processes are joined).
    assert quality.main(["--report", str(out)]) == 0
    again = capsys.readouterr().out
    assert [line for line in table.splitlines() if "±" in line] == [
        line for line in again.splitlines() if "±" in line
    ]


@needs_fashion
def test_quality_benchmark_runs_the_dit_rows_on_the_built_in_flux_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quality.json"
    variants = ["tuneqdm-w4-i1", "peqa-w4", "lora-r16-w4", "full"]
    args = ["--model", str(quality.common.REPO_ROOT / "models" / "fashion-flux")]
    args += ["--data-dir", str(fashion_dir()), "--subjects", "1", "--seeds", "0"]
    args += ["--steps", "2", "--contexts", "1", "--images", "1", "--sample-steps", "2"]
    args += ["--variants", *variants, "--against", "peqa-w4", "--json", str(out)]
    assert quality.main(args) == 0
    results = json.loads(out.read_text())["results"]
    assert list(results) == variants
    kib = {name: results[name]["0"][0]["kib"] for name in variants}
    # Scales < LoRA pairs < the whole transformer; TuneQDM adds s_in to PEQA's s_out.
    assert kib["peqa-w4"] < kib["tuneqdm-w4-i1"] < kib["lora-r16-w4"] < kib["full"]
    table = capsys.readouterr().out
    assert "paired against peqa-w4" in table and "adapter KiB" in table
    with pytest.raises(SystemExit):
        quality.main([*args, "--export-ranks", "4"])


def test_quality_benchmark_scores_lora_exports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "quality.json"
    args = ["--data-dir", str(fashion_dir()), "--subjects", "1", "--seeds", "0", "--steps", "2"]
    args += ["--contexts", "1", "--images", "1", "--sample-steps", "2", "--no-reference"]
    args += ["--variants", "tuneqdm-w4-i1", "--export-ranks", "2", "8", "--json", str(out)]
    assert quality.main(args) == 0
    results = json.loads(out.read_text())["results"]
    rows = ["tuneqdm-w4-i1", "tuneqdm-w4-i1 LoRA r2 on float", "tuneqdm-w4-i1 LoRA r8 on float"]
    assert list(results) == rows
    r2, r8 = (results[row]["0"][0] for row in rows[1:])
    assert 0 < r8["relative_error"] < r2["relative_error"] < 1
    assert all(-1 <= results[row]["0"][0]["subject"] <= 1 for row in rows)
    table = capsys.readouterr().out
    assert all(row in table for row in rows)


def test_export_rank_benchmark_is_exact_at_full_rank(tmp_path: Path) -> None:
    out = tmp_path / "export.json"
    args = ["--data-dir", str(fashion_dir()), "--steps", "2", "--ranks", "2", "0"]
    assert export_rank.main([*args, "--sample-steps", "2", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    by = {(r["rank"], r["with_quantization_error"]): r for r in results}
    full = max(rank for rank, _ in by)
    assert by[(full, True)]["output_error"] < 1e-4 and by[(full, True)]["pixel_difference"] < 1
    assert by[(2, True)]["weight_error"] > by[(full, True)]["weight_error"] == 0.0
    # Without the quantization error, full rank still differs by the quantization error.
    assert by[(full, False)]["output_error"] > 10 * by[(full, True)]["output_error"]


def test_quality_benchmark_rejects_bad_settings() -> None:
    with pytest.raises(SystemExit):
        quality.main(["--subjects", "99"])
    with pytest.raises(SystemExit):
        quality.main(["--variants", "nope"])
