"""Smoke tests of the benchmark scripts on tiny settings: they run and write the JSON their
tables come from. Timings are not checked (CI machines are noisy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, json_path: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--json", str(json_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(json_path.read_text())
    return report


@pytest.mark.timeout(300)
def test_train_memory_runs_each_variant_in_its_own_process(tmp_path: Path) -> None:
    variants = ["full", "materialising-w8", "peqa-w4", "tuneqdm-w4-ckpt"]
    report = _run(
        "train_memory.py",
        *("--arch", "tiny-sd1", "--latent", "8", "--warmup", "0", "--steps", "1"),
        *("--variants", *variants),
        json_path=tmp_path / "train.json",
    )
    rows = report["variants"]
    assert [r["variant"] for r in rows] == variants
    for row in rows:
        assert "error" not in row, row
        assert row["train_peak_bytes"] > 0 and row["step_seconds"] > 0
    by_name = {r["variant"]: r for r in rows}
    assert by_name["tuneqdm-w4-ckpt"]["checkpointing"] is True
    assert by_name["tuneqdm-w4-ckpt"]["bits"] == 4
    # Scales only: s_out of every layer (PEQA), plus s_in, twice over 2 intervals (TuneQDM).
    assert by_name["peqa-w4"]["trainable_values"] < by_name["tuneqdm-w4-ckpt"]["trainable_values"]
    assert by_name["tuneqdm-w4-ckpt"]["trainable_values"] < by_name["full"]["trainable_values"]


@pytest.mark.timeout(300)
def test_train_memory_runs_the_sdxl_architecture(tmp_path: Path) -> None:
    """The SDXL UNet's added conditioning (pooled text, time ids) goes into every step; the
    tiny SDXL shape stands in for the full one (--arch sdxl, docs/benchmarks.md)."""
    report = _run(
        "train_memory.py",
        *("--arch", "tiny-sdxl", "--latent", "8", "--warmup", "0", "--steps", "1"),
        *("--variants", "tuneqdm-w4-ckpt"),
        json_path=tmp_path / "train.json",
    )
    [row] = report["variants"]
    assert "error" not in row, row
    assert row["train_peak_bytes"] > 0 and row["step_seconds"] > 0


@pytest.mark.timeout(300)
def test_serving_reports_swaps_and_every_throughput_mode(tmp_path: Path) -> None:
    report = _run(
        "serving.py",
        *("--swap-arch", "tiny-sd1", "--file-reps", "2", "--slot-reps", "3"),
        *("--models", "tiny-sd1", "--latent", "8", "--steps", "2", "--reps", "1"),
        json_path=tmp_path / "serving.json",
    )
    assert [r["swap"] for r in report["swap"]] == ["file -> memory", "memory -> slot"]
    assert all(r["p99_ms"] >= r["p50_ms"] > 0 for r in report["swap"])
    modes = {(r["mode"], r["distinct"]) for r in report["throughput"]}
    # The float row: the unquantized UNet a user would run instead.
    assert modes == {("bare", 0), ("float", 0), ("per-sample", 1)} | {
        ("mixed", d) for d in (1, 2, 4, 8)
    } | {("grouped", d) for d in (2, 4, 8)}
    assert all(r["images_per_s"] > 0 for r in report["throughput"])


@pytest.mark.timeout(300)
def test_benchmarks_compare_the_storage_modes(tmp_path: Path) -> None:
    train = _run(
        "train_memory.py",
        *("--arch", "tiny-sd1", "--latent", "8", "--warmup", "0", "--steps", "1"),
        *("--variants", "full", "tuneqdm-w4-ckpt", "--storage-mode", "both"),
        json_path=tmp_path / "train.json",
    )
    rows = {r["variant"]: r for r in train["variants"]}
    assert list(rows) == ["full", "tuneqdm-w4-ckpt", "tuneqdm-w4-ckpt-resident"]
    assert [r["storage_mode"] for r in rows.values()] == [None, "packed", "resident"]
    assert all("error" not in r and r["step_seconds"] > 0 for r in rows.values())
    serving = _run(
        "serving.py",
        *("--swap-arch", "tiny-sd1", "--file-reps", "2", "--slot-reps", "3", "--steps", "2"),
        *("--models", "tiny-sd1", "--latent", "8", "--reps", "1", "--storage-mode", "both"),
        json_path=tmp_path / "serving.json",
    )
    seen = {(r["storage"], r["mode"], r["distinct"]) for r in serving["throughput"]}
    assert {("resident", "bare", 0), ("resident", "mixed", 1), ("resident", "mixed", 8)} <= seen
    assert {("resident", "per-sample", 1), ("packed", "per-sample", 1)} <= seen
    assert {("packed", "mixed", 1), ("float", "float", 0)} <= seen


def test_train_memory_table_rows_fit_the_header_also_for_failed_variants() -> None:
    from benchmarks.train_memory import _header, _row

    failed = _row({"variant": "full", "error": "exit code 1"}, [{}, {}])
    assert len(failed) == len(_header(["full", "mat"]))
    failed = _row({"variant": "lora-w4", "error": "exit code 1"}, [{}])
    assert len(failed) == len(_header(["lora"]))


def test_train_memory_rejects_an_unknown_variant() -> None:
    from benchmarks.train_memory import Variant

    assert Variant.parse("tuneqdm-w4-ckpt") == Variant("tuneqdm-w4-ckpt", "tuneqdm", 4, True)
    assert Variant.parse("full") == Variant("full", "full", None, False)
    assert Variant.parse("peqa-w8-resident").storage_mode == "resident"
    assert Variant.parse("materialising-w8").storage_mode is None
    assert Variant.parse("lora-w4-ckpt") == Variant("lora-w4-ckpt", "lora", 4, True)
    for bad in (
        "full-w8",
        "tuneqdm",
        "lora",
        "lora-w4-resident",
        "tuneqdm-w3",
        "materialising-w8-resident",
    ):
        with pytest.raises(ValueError, match="unknown variant"):
            Variant.parse(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.timeout(300)
def test_benchmarks_run_on_cuda(tmp_path: Path) -> None:
    train = _run(
        "train_memory.py",
        *("--device", "cuda", "--arch", "tiny-sd1", "--latent", "8", "--warmup", "1"),
        *("--steps", "1", "--variants", "full", "materialising-w8", "tuneqdm-w4-ckpt"),
        json_path=tmp_path / "train.json",
    )
    assert train["settings"]["bf16"] is True
    assert all("error" not in r and r["train_peak_bytes"] > 0 for r in train["variants"])
    serving = _run(
        "serving.py",
        *("--device", "cuda", "--swap-arch", "tiny-sd1", "--file-reps", "2", "--slot-reps", "3"),
        *("--models", "tiny-sd1", "--latent", "8", "--steps", "2", "--reps", "1"),
        json_path=tmp_path / "serving.json",
    )
    assert [r["swap"] for r in serving["swap"]] == [
        "file -> memory",
        "memory -> slot",
        "host memory -> slot",
    ]


@pytest.mark.timeout(300)
def test_cotrain_runs_each_group_size_in_its_own_process(tmp_path: Path) -> None:
    report = _run(
        "cotrain.py",
        *("--arch", "tiny-sd1", "--latent", "4", "--ks", "1", "2", "--warmup", "0", "--steps", "1"),
        json_path=tmp_path / "cotrain.json",
    )
    groups = report["groups"]
    assert [g["k"] for g in groups] == [1, 2]
    for group in groups:
        assert "error" not in group, group
        assert group["train_peak_bytes"] > 0 and group["step_seconds"] > 0
        want = group["k"] * 3600 / (group["step_seconds"] * report["finetune_steps"])
        assert group["finetunes_per_hour"] == pytest.approx(want)


def test_upload_images_compares_the_stored_photo_pipelines(tmp_path: Path) -> None:
    report = _run(
        "upload_images.py", "--side", "2304", "--repeat", "1", json_path=tmp_path / "u.json"
    )
    before, after = report["rows"].values()
    # 2304 > 2 × the default largest training resolution (1024): downscaled to 2048.
    assert before["size"] == [2304, 2304] and after["size"] == [2048, 2048]
    assert 0 < after["bytes"] < before["bytes"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("arch", "variants"),
    [("tiny-flux", ["tuneqdm-w4-ckpt", "lora-w4"]), ("tiny-sd3", ["lora-w4", "materialising-w4"])],
)
def test_train_memory_runs_the_flow_transformers(
    tmp_path: Path, arch: str, variants: list[str]
) -> None:
    """--arch flux/sd3 at toy width: a subset of blocks, a flow-matching step per variant, the
    peft LoRA rank 16 training only its own matrices on the frozen quantized base, and the
    full-depth extrapolation written beside the measured rows."""
    from benchmarks import dit_blocks

    report = _run(
        "train_memory.py",
        *("--arch", arch, "--latent", "4", "--warmup", "0", "--steps", "1"),
        *("--variants", *variants),
        json_path=tmp_path / "train.json",
    )
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == variants
    for row in rows.values():
        assert "error" not in row, row
        assert row["train_peak_bytes"] > 0 and row["step_seconds"] > 0
        assert torch.isfinite(torch.tensor(row["loss"]))
        extra = row["extrapolated"]
        assert extra["train_peak_bytes_high"] >= extra["train_peak_bytes_low"] > 0
    # LoRA: r·(in + out) values for each of diffusers' DreamBooth target layers, nothing else.
    model = dit_blocks.build_subset(arch)
    targets = dit_blocks.LORA_TARGETS[dit_blocks.family(arch)]
    expected = sum(
        16 * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets)
    )
    assert rows["lora-w4"]["trainable_values"] == expected
    counts = dit_blocks.parameter_counts(arch)
    assert counts["full"] > counts["subset"] == sum(p.numel() for p in model.parameters())


@pytest.mark.timeout(300)
def test_flux_parts_of_the_gpu_script_run_at_toy_width(tmp_path: Path) -> None:
    """gpu.sh's FLUX parts on the CPU at toy width: the whole transformer (all 19 + 38 blocks)
    built and quantized in one go, TuneQDM against a checkpointed LoRA, and one transformer
    call with and without a routed adapter."""
    report = _run(
        "train_memory.py",
        *("--arch", "tiny-flux", "--full-depth", "--latent", "4", "--text-tokens", "8"),
        *("--warmup", "0", "--steps", "1", "--variants", "tuneqdm-w4-ckpt", "lora-w4-ckpt"),
        json_path=tmp_path / "train.json",
    )
    assert report["settings"]["full_depth"] is True
    rows = {r["variant"]: r for r in report["variants"]}
    assert list(rows) == ["tuneqdm-w4-ckpt", "lora-w4-ckpt"]
    assert all("error" not in r and "extrapolated" not in r for r in rows.values()), rows
    assert rows["lora-w4-ckpt"]["checkpointing"] is True
    overhead = _run(
        "dit_overhead.py",
        *("--arch", "tiny-flux", "--full-depth", "--latent", "4", "--text-tokens", "8"),
        *("--reps", "1"),
        json_path=tmp_path / "overhead.json",
    )
    assert set(overhead["seconds"]) == {"bare", "adapter"}
    assert all(t[0] > 0 for t in overhead["seconds"].values())
