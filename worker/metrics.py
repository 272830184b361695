"""What a worker process measures, served on its own port for Prometheus.

Every event is counted where it happens, in the process that does the work: a claim, a job's
final state, a watchdog give-up, a training step, a generation batch, an export, a webhook
attempt. Counters and histograms (never quantiles) so that Prometheus can sum them over every
worker, take rates and re-window them. The few calls below are all the worker makes:
`job_started` where a job is claimed, `job_finished` where it reaches a final state, and one
function per timing.

Each worker process is its own scrape target on TUNEQDM_WORKER_METRICS_PORT (one per GPU with
`--pool=solo`, where tasks run in the serving process). A `--pool=prefork` worker (the webhook
sender) runs its tasks in child processes: with PROMETHEUS_MULTIPROC_DIR set, every process
writes its values to files there and the main process serves their sum (prometheus_client's
multiprocess mode; `reset_multiprocess_dir` empties the folder when the worker starts).

Queue depth, oldest queued job, workers up per base and stored bytes are read from the broker
and the registry by the API's /metrics (app/metrics.py): no worker owns those facts, and a dead
worker cannot report itself down.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.metrics import BuildInfo

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds: from a few milliseconds (a tiny model on CPU) to an hour (a queue behind long jobs).
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
RUN_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WEBHOOK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

JOBS_FINISHED = Counter(
    "tuneqdm_jobs_finished_total",
    "Jobs that reached a final state in this worker, by kind, base, status and cause.",
    ["kind", "base", "status", "cause"],
)
JOB_ATTEMPTS = Counter(
    "tuneqdm_job_attempts_total",
    "Attempts started (claims won) in this worker; above jobs finished when jobs are retried.",
    ["kind", "base"],
)
WATCHDOG_GIVE_UPS = Counter(
    "tuneqdm_watchdog_give_ups_total",
    "Jobs given up by their watchdog (no progress for TUNEQDM_PROGRESS_TIMEOUT_S).",
    ["kind"],
)
QUEUE_WAIT = Histogram(
    "tuneqdm_queue_wait_seconds",
    "Seconds from a job's submission to its first claim.",
    ["kind", "base"],
    buckets=WAIT_BUCKETS,
)
FINETUNE_STEP = Histogram(
    "tuneqdm_finetune_step_seconds",
    "Wall time of one fine-tune training step (a co-training step counts once).",
    ["base"],
    buckets=STEP_BUCKETS,
)
FIRST_STEP = Histogram(
    "tuneqdm_finetune_first_step_seconds",
    "Seconds from the start of a fine-tune attempt's training to its first step (photo "
    "download and encoding, class images, the first step itself).",
    ["base"],
    buckets=RUN_BUCKETS,
)
GENERATION = Histogram(
    "tuneqdm_generation_seconds",
    "Wall time of one generation batch (sampling all its images).",
    ["base"],
    buckets=RUN_BUCKETS,
)
EXPORT = Histogram(
    "tuneqdm_export_seconds",
    "Wall time of one export, by format and final status.",
    ["base", "format", "status"],
    buckets=RUN_BUCKETS,
)
WEBHOOK = Histogram(
    "tuneqdm_webhook_delivery_seconds",
    "Wall time of one webhook delivery attempt, by outcome (delivered, retry, failed).",
    ["outcome"],
    buckets=WEBHOOK_BUCKETS,
)
# A gauge per process; in multiprocess mode the live processes' values are shown side by side.
BASE_LOAD = Gauge(
    "tuneqdm_base_load_seconds",
    "Seconds this worker took to load (and quantize, or read from the cache) its base model.",
    ["base"],
    multiprocess_mode="liveall",
)

KINDS = {"finetune_jobs": "finetune", "generation_jobs": "generation", "adapter_exports": "export"}


def kind_of(table: str) -> str:
    """A job table's `kind` label."""
    return KINDS.get(table, table)


def cause_of(status: str, error: str | None) -> str:
    """A small fixed set of reasons for the `cause` label, read from the job's final message
    (worker/failures.py and worker/jobs.py write those messages)."""
    if status != "failed":
        return "none"
    text = (error or "").lower()
    if "ran out of memory" in text:
        return "out_of_memory"
    if text.startswith(("gave up after", "the worker stopped")):
        return "attempts_exhausted"
    if "time limit" in text:
        return "time_limit"
    if "photo" in text or text.startswith(("this service", "this fine-tune", "the adapter")):
        return "input"
    if "base model could not be loaded" in text:
        return "base_load"
    return "error"


def declare(base: str) -> None:
    """Create this base's job series at 0 when the worker starts: a counter that first appears
    at 1 loses that first increase to rate() and increase()."""
    for kind in ("finetune", "generation", "export"):
        JOB_ATTEMPTS.labels(kind, base)
        QUEUE_WAIT.labels(kind, base)
        JOBS_FINISHED.labels(kind, base, "succeeded", "none")
        JOBS_FINISHED.labels(kind, base, "failed", "error")


def job_started(kind: str, base: str, attempt: int, created: datetime, started: datetime) -> None:
    """A claim won: one more attempt; on the first, how long the job waited in its queue."""
    JOB_ATTEMPTS.labels(kind, base).inc()
    if attempt == 1:
        QUEUE_WAIT.labels(kind, base).observe(max(0.0, (started - created).total_seconds()))


def job_finished(kind: str, base: str, status: str, error: str | None = None) -> None:
    JOBS_FINISHED.labels(kind, base, status, cause_of(status, error)).inc()


def watchdog_gave_up(kind: str) -> None:
    WATCHDOG_GIVE_UPS.labels(kind).inc()


def finetune_step(base: str, seconds: float) -> None:
    FINETUNE_STEP.labels(base).observe(seconds)


def first_step(base: str, seconds: float) -> None:
    FIRST_STEP.labels(base).observe(seconds)


def generation_batch(base: str, seconds: float) -> None:
    GENERATION.labels(base).observe(seconds)


def export_done(base: str, fmt: str, status: str, seconds: float) -> None:
    EXPORT.labels(base, fmt, status).observe(seconds)


def webhook_attempt(outcome: str, seconds: float) -> None:
    WEBHOOK.labels(outcome).observe(seconds)


def base_loaded(base: str, seconds: float) -> None:
    BASE_LOAD.labels(base).set(seconds)


class GpuMemory(Collector):
    """GPU memory this process holds, read at scrape time; nothing without CUDA in use (a
    webhook sender never imports torch, a CPU worker has no CUDA)."""

    def describe(self) -> Iterable[Metric]:
        # Without it, registering would call collect(): at worker start the base loader's
        # thread may be importing torch right then, and a half-imported torch has no `cuda`
        # (the metrics server then never started).
        return []

    def collect(self) -> Iterable[Metric]:
        # A module another thread is still importing is in sys.modules already.
        cuda = getattr(sys.modules.get("torch"), "cuda", None)
        if cuda is None or not hasattr(cuda, "is_initialized"):
            return
        if not cuda.is_available() or not cuda.is_initialized():
            return
        allocated = GaugeMetricFamily(
            "tuneqdm_gpu_memory_allocated_bytes",
            "GPU memory held by this worker's tensors now.",
            labels=["device"],
        )
        peak = GaugeMetricFamily(
            "tuneqdm_gpu_memory_peak_bytes",
            "Most GPU memory this worker's tensors held since it started.",
            labels=["device"],
        )
        for index in range(cuda.device_count()):
            device = f"cuda:{index}"
            allocated.add_metric([device], float(cuda.memory_allocated(index)))
            peak.add_metric([device], float(cuda.max_memory_allocated(index)))
        yield allocated
        yield peak


_extras_registered = False


def _register_extras(registry: CollectorRegistry) -> None:
    registry.register(BuildInfo())
    registry.register(GpuMemory())


def multiproc_dir() -> Path | None:
    folder = os.environ.get(MULTIPROC_ENV)
    return Path(folder) if folder else None


def reset_multiprocess_dir() -> None:
    """Empty the multiprocess folder before a worker's processes start writing into it: files
    of an earlier run would be summed with this one's."""
    folder = multiproc_dir()
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)


def child_exited(pid: int) -> None:
    """A prefork child ended: its live gauges leave the sum."""
    if multiproc_dir() is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def registry() -> CollectorRegistry:
    """What this process serves: its own metrics, or every process's in multiprocess mode."""
    global _extras_registered
    if multiproc_dir() is not None:
        from prometheus_client import multiprocess

        combined = CollectorRegistry()
        multiprocess.MultiProcessCollector(combined)
        _register_extras(combined)
        return combined
    if not _extras_registered:
        _register_extras(REGISTRY)
        _extras_registered = True
    return REGISTRY


def serve(port: int | None, host: str = "0.0.0.0") -> None:
    """Start the metrics HTTP server in a daemon thread (no-op without a port)."""
    if not port:
        return
    start_http_server(port, addr=host, registry=registry())
    log.info("worker metrics on %s:%d/metrics", host, port)
