"""What a worker process measures, served on its own port for Prometheus (optional).

The API's /metrics already derives step time and generation latency from the registry rows
(app/metrics.py); this adds what only the process knows: how long its base model took to load,
and per-step / per-batch histograms. One worker process per GPU (`--pool=solo`) means one
registry per process, so prometheus_client's default registry is enough — no multiprocess mode.
Each worker on each machine is its own scrape target on TUNEQDM_WORKER_METRICS_PORT.
"""

from __future__ import annotations

import logging

from prometheus_client import Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

BASE_LOAD_SECONDS = Gauge(
    "tuneqdm_worker_base_load_seconds",
    "Seconds this worker took to load (and quantize, or read from the cache) its base model.",
)
FINETUNE_STEP_SECONDS = Histogram(
    "tuneqdm_worker_finetune_step_seconds",
    "Wall time of one fine-tune training step in this worker.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
GENERATION_SECONDS = Histogram(
    "tuneqdm_worker_generation_seconds",
    "Wall time of one generation batch (sampling all its images) in this worker.",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


def serve(port: int | None) -> None:
    """Start the metrics HTTP server in a daemon thread (no-op without a port)."""
    if not port:
        return
    start_http_server(port)
    log.info("worker metrics on :%d/metrics", port)
