"""The worker's own metrics: observed by real fine-tune and generation runs, served over HTTP."""

from __future__ import annotations

import urllib.request

from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from app.models import Tenant
from tests.service.procs import free_port
from tests.worker.conftest import submit_finetune
from tests.worker.test_tasks import _generation
from worker import metrics
from worker.context import Context
from worker.finetunes import run_finetune
from worker.generations import run_generation


def _count(name: str) -> float:
    return REGISTRY.get_sample_value(f"{name}_count") or 0.0


def test_steps_generations_and_base_load_are_measured_and_served(
    ctx: Context, tenant: Tenant
) -> None:
    steps, batches = (
        _count("tuneqdm_worker_finetune_step_seconds"),
        _count("tuneqdm_worker_generation_seconds"),
    )
    job_id = submit_finetune(ctx, tenant, '{"steps": 3, "resolution": 64, "seed": 1}')
    assert run_finetune(job_id, ctx) == "succeeded"
    # Three steps; the first one's interval (photo encoding) is left out.
    assert _count("tuneqdm_worker_finetune_step_seconds") == steps + 2
    gen_id = _generation(ctx, tenant, "ad_" + job_id.removeprefix("ft_"), seed=3)
    assert run_generation(gen_id, ctx) == "succeeded (batch of 1)"
    assert _count("tuneqdm_worker_generation_seconds") == batches + 1
    assert (REGISTRY.get_sample_value("tuneqdm_worker_base_load_seconds") or 0) > 0

    port = free_port()
    metrics.serve(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        served = {f.name for f in text_string_to_metric_families(response.read().decode())}
    assert {
        "tuneqdm_worker_base_load_seconds",
        "tuneqdm_worker_finetune_step_seconds",
        "tuneqdm_worker_generation_seconds",
    } <= served
