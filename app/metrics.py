"""`GET /metrics` in Prometheus text format.

HTTP requests and latency come from prometheus-fastapi-instrumentator. Everything about jobs is
read at scrape time from the places that are the truth for it, so one scrape of any API replica
sees the whole deployment, wherever its workers run:

- queue depth per queue from the broker (Redis LLEN, or the embedded SQLite broker's table);
- jobs by kind and status from the registry;
- what the workers measured, derived from the rows of recently finished jobs: seconds per
  fine-tune step and generation latency (started → finished), plus queue wait (created →
  started). Workers on other machines need no metrics port, shared directory or push gateway.

The base load time is measured in the worker process itself (worker/metrics.py serves it on
TUNEQDM_WORKER_METRICS_PORT), as no row records it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import timedelta
from statistics import quantiles
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import FINETUNE_STATUSES, FinetuneJob, GenerationJob, ServedBase, utcnow
from app.queue import TaskSender, queues_of

log = logging.getLogger(__name__)

# Finished jobs younger than this feed the latency gauges; a long enough window to have a few
# jobs, short enough that a regression shows within the hour.
RECENT = timedelta(hours=1)
# At most this many recent rows are read per scrape, so a scrape stays cheap on a busy registry.
RECENT_ROWS = 500
QUANTILES = ("0.5", "0.9", "0.99")


def _quantile_gauge(name: str, doc: str, values: list[float]) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, doc, labels=["quantile"])
    if len(values) == 1:
        values = values * 2  # statistics.quantiles needs two points
    if values:
        cuts = quantiles(values, n=100, method="inclusive")
        for q in QUANTILES:
            gauge.add_metric([q], cuts[round(float(q) * 100) - 1])
    return gauge


class RegistryCollector(Collector):
    """Gauges computed from the database and the broker each time Prometheus scrapes."""

    def __init__(self, session: Session, sender: TaskSender, default_base: str) -> None:
        self.session = session
        self.sender = sender
        self.default_base = default_base

    def collect(self) -> Iterable[Metric]:
        yield from self._queues()
        try:
            # Read everything before yielding, so a failure half-way emits no partial families.
            families = list(self._jobs(self.session))
        except Exception as exc:
            # A scrape must answer even when the database is down; the up-gauge says so.
            log.error("metrics: registry not readable: %s", exc)
            yield GaugeMetricFamily(
                "tuneqdm_registry_up", "1 when the registry answered this scrape.", value=0
            )
        else:
            yield from families

    def _queues(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tuneqdm_broker_up", "1 when the broker answered this scrape.")
        depth = GaugeMetricFamily(
            "tuneqdm_queue_messages", "Messages waiting in a broker queue.", labels=["queue"]
        )
        try:
            # Each registered base has its own queues (app.queue.base_queue).
            bases = set(self.session.scalars(select(ServedBase.name)))
        except Exception as exc:
            log.error("metrics: registry not readable: %s", exc)
            self.session.rollback()
            bases = set()
        bases.add(self.default_base)  # its queues exist before its first worker registers
        try:
            for queue, size in self.sender.queue_sizes(queues_of(sorted(bases))).items():
                depth.add_metric([queue], size)
            up.add_metric([], 1)
        except Exception as exc:
            log.error("metrics: broker not readable: %s", exc)
            up.add_metric([], 0)
        yield up
        yield depth

    def _jobs(self, session: Session) -> Iterator[Metric]:
        jobs = GaugeMetricFamily(
            "tuneqdm_jobs", "Jobs in the registry by kind and status.", labels=["kind", "status"]
        )
        for kind, model in (("finetune", FinetuneJob), ("generation", GenerationJob)):
            counts: dict[str, int] = {s: 0 for s in FINETUNE_STATUSES}
            for status, n in session.execute(
                select(model.status, func.count()).group_by(model.status)
            ):
                counts[status] = int(n)
            for status, n in counts.items():
                jobs.add_metric([kind, status], n)
        yield jobs
        yield GaugeMetricFamily(
            "tuneqdm_registry_up", "1 when the registry answered this scrape.", value=1
        )

        since = utcnow() - RECENT
        step_s: list[float] = []
        for started, finished, total, resumed in session.execute(
            _recent(FinetuneJob, since).add_columns(
                FinetuneJob.progress_total, FinetuneJob.resumed_from_step
            )
        ):
            steps = total - (resumed or 0)
            if steps > 0:
                step_s.append((finished - started).total_seconds() / steps)
        yield _quantile_gauge(
            "tuneqdm_finetune_step_seconds",
            "Seconds per training step of fine-tunes that succeeded in the last hour "
            "(run time of the last attempt / its steps; includes loading and encoding).",
            step_s,
        )
        run_s = [
            (finished - started).total_seconds()
            for started, finished in session.execute(_recent(GenerationJob, since))
        ]
        yield _quantile_gauge(
            "tuneqdm_generation_seconds",
            "Run time (started → finished) of generations that succeeded in the last hour.",
            run_s,
        )
        wait_s = [
            (started - created).total_seconds()
            for created, started in session.execute(
                select(GenerationJob.created_at, GenerationJob.started_at)
                .where(GenerationJob.started_at.is_not(None), GenerationJob.started_at >= since)
                .order_by(GenerationJob.started_at.desc())
                .limit(RECENT_ROWS)
            )
            if started is not None
        ]
        yield _quantile_gauge(
            "tuneqdm_generation_queue_wait_seconds",
            "Seconds from submission to start of generations started in the last hour.",
            wait_s,
        )


def _recent(model: Any, since: Any) -> Any:
    return (
        select(model.started_at, model.finished_at)
        .where(
            model.status == "succeeded",
            model.finished_at >= since,
            model.started_at.is_not(None),
        )
        .order_by(model.finished_at.desc())
        .limit(RECENT_ROWS)
    )


def install(app: FastAPI) -> None:
    """Instrument `app`'s HTTP handlers; each app gets its own registry (tests build many)."""
    registry = CollectorRegistry()
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app)
    app.state.metrics_registry = registry


def render(app: FastAPI, *, session: Session, sender: TaskSender, default_base: str) -> bytes:
    """The text exposition: HTTP metrics, then the gauges read now."""
    scraped = CollectorRegistry()
    scraped.register(RegistryCollector(session, sender, default_base))
    return generate_latest(app.state.metrics_registry) + generate_latest(scraped)
