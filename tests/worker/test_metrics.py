"""The worker's own metrics: counted by real fine-tune and generation runs, served over HTTP."""

from __future__ import annotations

import sys
import types
import urllib.request

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from app.models import Tenant
from tests.service.procs import free_port
from tests.worker.conftest import submit_finetune
from tests.worker.test_tasks import _generation
from worker import metrics
from worker.context import Context
from worker.finetunes import run_finetune
from worker.generations import run_generation


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_jobs_steps_generations_and_base_load_are_measured_and_served(
    ctx: Context, tenant: Tenant
) -> None:
    base = ctx.settings.base_model
    finished = {"kind": "finetune", "base": base, "status": "succeeded", "cause": "none"}
    generated = {**finished, "kind": "generation"}
    before = {
        "finished": _value("tuneqdm_jobs_finished_total", **finished),
        "generated": _value("tuneqdm_jobs_finished_total", **generated),
        "attempts": _value("tuneqdm_job_attempts_total", kind="finetune", base=base),
        "waits": _value("tuneqdm_queue_wait_seconds_count", kind="finetune", base=base),
        "steps": _value("tuneqdm_finetune_step_seconds_count", base=base),
        "first": _value("tuneqdm_finetune_first_step_seconds_count", base=base),
        "batches": _value("tuneqdm_generation_seconds_count", base=base),
    }
    job_id = submit_finetune(ctx, tenant, '{"steps": 3, "resolution": 64, "seed": 1}')
    assert run_finetune(job_id, ctx) == "succeeded"
    assert _value("tuneqdm_jobs_finished_total", **finished) == before["finished"] + 1
    assert _value("tuneqdm_job_attempts_total", kind="finetune", base=base) == (
        before["attempts"] + 1
    )
    assert _value("tuneqdm_queue_wait_seconds_count", kind="finetune", base=base) == (
        before["waits"] + 1
    )
    # Three steps: the first one's interval (photo encoding) is its own histogram.
    assert _value("tuneqdm_finetune_step_seconds_count", base=base) == before["steps"] + 2
    assert _value("tuneqdm_finetune_first_step_seconds_count", base=base) == before["first"] + 1
    gen_id = _generation(ctx, tenant, "ad_" + job_id.removeprefix("ft_"), seed=3)
    assert run_generation(gen_id, ctx) == "succeeded (batch of 1)"
    assert _value("tuneqdm_generation_seconds_count", base=base) == before["batches"] + 1
    assert _value("tuneqdm_jobs_finished_total", **generated) == before["generated"] + 1
    assert _value("tuneqdm_base_load_seconds", base=base) > 0

    port = free_port()
    metrics.serve(port, host="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        served = {f.name for f in text_string_to_metric_families(response.read().decode())}
    assert {
        "tuneqdm_build_info",
        "tuneqdm_base_load_seconds",
        "tuneqdm_jobs_finished",  # the parser drops a counter's _total
        "tuneqdm_job_attempts",
        "tuneqdm_queue_wait_seconds",
        "tuneqdm_finetune_step_seconds",
        "tuneqdm_finetune_first_step_seconds",
        "tuneqdm_generation_seconds",
    } <= served


def test_failure_causes_are_a_small_fixed_set() -> None:
    from worker.failures import OOM_HINT
    from worker.jobs import attempts_exhausted

    assert metrics.cause_of("succeeded", None) == "none"
    assert metrics.cause_of("failed", OOM_HINT.format(where="")) == "out_of_memory"
    assert metrics.cause_of("failed", attempts_exhausted(4, 3, None)) == "attempts_exhausted"
    assert metrics.cause_of("failed", attempts_exhausted(4, 3, "boom")) == "attempts_exhausted"
    assert metrics.cause_of("failed", "the worker failed (ValueError)") == "error"


def test_gpu_memory_is_safe_while_another_thread_imports_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At worker start the base loader's thread imports torch while the main thread starts the
    metrics server: registering must not read torch, and a scrape meanwhile finds a
    half-imported module (in sys.modules, no `cuda` yet) and reports no GPU series."""
    half = types.ModuleType("torch")
    monkeypatch.setitem(sys.modules, "torch", half)
    registry = CollectorRegistry()
    registry.register(metrics.GpuMemory())
    assert list(registry.collect()) == []
    half.cuda = types.ModuleType("torch.cuda")  # type: ignore[attr-defined]
    assert list(registry.collect()) == []
