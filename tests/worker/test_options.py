"""One source for the training options: the core's ``FinetuneConfig``. The API's
``FinetuneParams`` (which cannot import the core), the worker's mapping and the CLI must follow
it; a field or a default that differs fails here unless it is listed below with its reason
(docs/library.md, "Training options")."""

from __future__ import annotations

import zlib
from dataclasses import MISSING, fields
from typing import Any, get_args, get_type_hints

import pytest

from app.schemas import FinetuneParams
from tuneqdm_core.cli import build_parser
from tuneqdm_core.finetune import FinetuneConfig
from worker.training import finetune_config

CORE = {f.name: f for f in fields(FinetuneConfig)}
API = FinetuneParams.model_fields

# Core fields the API leaves out on purpose: the service keeps the core's default.
CORE_ONLY = {
    "weight_decay": "no weight decay on scale vectors; not a user's choice",
    "max_grad_norm": "a safety rail, not a tuning knob",
    "init_sigma": "random initial scales are a research option",
    "class_image_steps": "sampling steps of class images; the default serves every base",
    "lora_rank": "method lora is a baseline of the benchmarks; the service trains scales",
    "lr_lora": "method lora is a baseline of the benchmarks; the service trains scales",
}
# Core methods the API does not offer: (why).
CORE_ONLY_METHODS = {"lora": "a baseline of the benchmarks (LoRA on the quantized base)"}
# API fields the core's FinetuneConfig does not have.
API_ONLY = {
    "bits": "the base's bit width (QuantConfig); a worker serves one, TUNEQDM_BITS",
    "validation_prompts": "progress images: the worker passes them as finetune(sampling=...)",
    "sample_every": "progress images: the worker passes them as finetune(sampling=...)",
    "keep_checkpoints": "the worker stores the adapter finetune(on_sample=...) hands it",
}
# Shared fields whose API default differs on purpose: (API default, why).
API_DEFAULTS = {
    "intervals": (None, "null is resolved per method by the schema (1, the core's default)"),
    "seed": (None, "null: the worker derives a stable seed from the job id"),
    "checkpoint_every": (100, "the service always checkpoints so a lost job resumes"),
    "resolution": (None, "null: the API stores the base's native size (GET /v1/bases)"),
}


def test_the_api_has_the_core_fields_and_no_others() -> None:
    assert set(CORE) - set(API) == set(CORE_ONLY)
    assert set(API) - set(CORE) == set(API_ONLY)


@pytest.mark.parametrize("name", sorted(set(CORE) & set(API)))
def test_a_shared_field_has_the_cores_default(name: str) -> None:
    core_default = CORE[name].default
    assert core_default is not MISSING
    api_default, _why = API_DEFAULTS.get(name, (core_default, ""))
    assert API[name].default == api_default
    if name not in API_DEFAULTS:
        # The resolved value of a fresh params object too (validators may fill defaults).
        assert getattr(FinetuneParams(), name) == core_default


def test_choices_are_the_same() -> None:
    core_hints = get_type_hints(FinetuneConfig)
    core_methods = tuple(m for m in get_args(core_hints["method"]) if m not in CORE_ONLY_METHODS)
    assert core_methods == get_args(API["method"].annotation)
    assert get_args(core_hints["mixed_precision"]) == get_args(API["mixed_precision"].annotation)


def test_the_worker_passes_every_shared_field_through() -> None:
    changed: dict[str, Any] = {
        "intervals": 3,
        "steps": 7,
        "lr_s_out": 0.01,
        "lr_s_in": 0.02,
        "lr": 1e-4,
        "batch_size": 2,
        "resolution": 64,
        "seed": 5,
        "prior_loss_weight": 0.5,
        "num_class_images": 3,
        "gradient_checkpointing": True,
        "mixed_precision": "fp16",
        "checkpoint_every": 9,
    }
    shared = (set(CORE) & set(API)) - {"method"}
    assert set(changed) == shared, "give the new field a non-default value here"
    for method in ("tuneqdm", "peqa"):
        values = {**changed, "intervals": 3 if method == "tuneqdm" else 1}
        params = FinetuneParams(method=method, **values)
        config = finetune_config(params, "ft_x")
        assert config.method == method
        for name, value in values.items():
            assert value != CORE[name].default or name == "intervals"
            assert getattr(config, name) == value, name


def test_default_params_give_the_cores_defaults() -> None:
    # The API always stores a resolution (the base's native size when none was asked for).
    config = finetune_config(FinetuneParams(resolution=32), "ft_abc")
    seed = zlib.crc32(b"ft_abc")
    every = API["checkpoint_every"].default
    assert config == FinetuneConfig(seed=seed, checkpoint_every=every, resolution=32)


def test_params_without_a_resolution_are_refused() -> None:
    with pytest.raises(ValueError, match="no resolution"):
        finetune_config(FinetuneParams(), "ft_abc")


def test_the_cli_has_a_flag_for_every_field_with_the_cores_default() -> None:
    args = build_parser().parse_args(["finetune", "model", "--out", "a.safetensors"])
    assert {name: getattr(args, name) for name in CORE} == {
        name: f.default for name, f in CORE.items()
    }
    chosen = ["--mixed-precision", "bf16", "--lr-s-out", "0.5", "--no-gradient-checkpointing"]
    args = build_parser().parse_args(["finetune", "m", "--out", "a", *chosen, "--intervals", "2"])
    assert (args.mixed_precision, args.lr_s_out) == ("bf16", 0.5)
    assert (args.gradient_checkpointing, args.intervals) == (False, 2)


def test_device_dependent_defaults_resolve_to_no_precision_and_no_checkpointing_on_cpu() -> None:
    # On CUDA: tests/core/test_cuda.py.
    assert FinetuneConfig().for_device("cpu") == FinetuneConfig(
        mixed_precision="no", gradient_checkpointing=False
    )
    chosen = FinetuneConfig(mixed_precision="bf16", gradient_checkpointing=True)
    assert chosen.for_device("cpu") == chosen
