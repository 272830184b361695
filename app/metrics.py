"""`GET /metrics` in Prometheus text format.

Events are counted by the process they happen in: the workers count claims, final states,
timings and webhook attempts and serve them on their own port (worker/metrics.py); the API
counts its HTTP requests (prometheus-fastapi-instrumentator) and the cancels it performs. Only
facts that no process owns are read here, at scrape time, from the places that are the truth
for them:

- queue depth per queue from the broker (Redis LLEN, or the embedded SQLite broker's table);
- jobs queued and running, and the age of the oldest queued job, per kind and base;
- workers up per base (base_workers rows refreshed every TUNEQDM_BASE_SEEN_EVERY_S: a dead
  worker cannot report itself down);
- bytes stored per tenant and their limit; free space where files are on a local disk.

This module imports no web framework at the top, so the workers can import `BuildInfo` and
the services `job_canceled` without it.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import (
    Adapter,
    BaseWorker,
    FinetuneCheckpoint,
    FinetuneImage,
    FinetuneJob,
    FinetuneSample,
    GeneratedImage,
    GenerationJob,
    ServedBase,
    Tenant,
    utcnow,
)
from app.queue import TaskSender, queues_of
from app.settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

JOB_KINDS: tuple[tuple[str, Any], ...] = (("finetune", FinetuneJob), ("generation", GenerationJob))

# Events the API process itself performs. One registry for the process, as the events are.
EVENTS = CollectorRegistry()
JOBS_CANCELED = Counter(
    "tuneqdm_jobs_finished_total",
    "Jobs that reached a final state; in the API: the cancels it performed.",
    ["kind", "base", "status", "cause"],
    registry=EVENTS,
)


def job_canceled(kind: str, base: str) -> None:
    """A cancel request moved a queued or running job to `canceled` (the worker counts the
    other final states)."""
    JOBS_CANCELED.labels(kind, base, "canceled", "request").inc()


@cache
def version() -> str:
    try:
        return metadata.version("tuneqdm")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


class BuildInfo(Collector):
    """`tuneqdm_build_info{version} 1`, served by the API and every worker."""

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "tuneqdm_build_info", "The running tuneqdm version (always 1).", labels=["version"]
        )
        info.add_metric([version()], 1)
        yield info


class RegistryCollector(Collector):
    """Gauges computed from the database and the broker each time Prometheus scrapes."""

    def __init__(self, session: Session, sender: TaskSender, settings: Settings) -> None:
        self.session = session
        self.sender = sender
        self.settings = settings

    def collect(self) -> Iterable[Metric]:
        yield from BuildInfo().collect()
        bases = self._bases()
        yield from self._queues(bases)
        try:
            # Read everything before yielding, so a failure half-way emits no partial families.
            families = list(self._registry(self.session, bases))
        except Exception as exc:
            # A scrape must answer even when the database is down; the up-gauge says so.
            log.error("metrics: registry not readable: %s", exc)
            self.session.rollback()
            yield GaugeMetricFamily(
                "tuneqdm_registry_up", "1 when the registry answered this scrape.", value=0
            )
        else:
            yield from families
        yield from self._disk()

    def _bases(self) -> list[str]:
        try:
            # Each registered base has its own queues (app.queue.base_queue).
            bases = set(self.session.scalars(select(ServedBase.name)))
        except Exception as exc:
            log.error("metrics: registry not readable: %s", exc)
            self.session.rollback()
            bases = set()
        bases.add(self.settings.base_model)  # its queues exist before its first worker registers
        return sorted(bases)

    def _queues(self, bases: list[str]) -> Iterator[Metric]:
        up = GaugeMetricFamily("tuneqdm_broker_up", "1 when the broker answered this scrape.")
        depth = GaugeMetricFamily(
            "tuneqdm_queue_messages", "Messages waiting in a broker queue.", labels=["queue"]
        )
        try:
            for queue, size in self.sender.queue_sizes(queues_of(bases)).items():
                depth.add_metric([queue], size)
            up.add_metric([], 1)
        except Exception as exc:
            log.error("metrics: broker not readable: %s", exc)
            up.add_metric([], 0)
        yield up
        yield depth

    def _registry(self, session: Session, bases: list[str]) -> Iterator[Metric]:
        now = utcnow()
        active = GaugeMetricFamily(
            "tuneqdm_jobs_active",
            "Jobs queued or running now, by kind, base and status.",
            labels=["kind", "base", "status"],
        )
        oldest = GaugeMetricFamily(
            "tuneqdm_queue_oldest_age_seconds",
            "Age of the oldest queued job by kind and base (0 when none is queued).",
            labels=["kind", "base"],
        )
        for kind, model in JOB_KINDS:
            counts = {(b, s): 0 for b in bases for s in ("queued", "running")}
            for base, status, n in session.execute(
                select(model.base_model, model.status, func.count())
                .where(model.status.in_(("queued", "running")))
                .group_by(model.base_model, model.status)
            ):
                counts[(base, status)] = int(n)
            for (base, status), n in sorted(counts.items()):
                active.add_metric([kind, base, status], n)
            ages = {b: 0.0 for b in bases}
            for base, created in session.execute(
                select(model.base_model, func.min(model.created_at))
                .where(model.status == "queued")
                .group_by(model.base_model)
            ):
                ages[base] = max(0.0, (now - _aware(created)).total_seconds())
            for base, age in sorted(ages.items()):
                oldest.add_metric([kind, base], age)
        yield active
        yield oldest

        # A live worker refreshes its row every TUNEQDM_BASE_SEEN_EVERY_S (app/services/bases.py).
        since = now - timedelta(seconds=3 * self.settings.base_seen_every_s)
        up = {b: 0 for b in bases}
        for base, n in session.execute(
            select(BaseWorker.base_name, func.count())
            .where(BaseWorker.last_seen_at >= since)
            .group_by(BaseWorker.base_name)
        ):
            up[base] = int(n)
        workers = GaugeMetricFamily(
            "tuneqdm_workers_up",
            "Worker processes of a base seen in the last 3 × TUNEQDM_BASE_SEEN_EVERY_S.",
            labels=["base"],
        )
        for base, n in sorted(up.items()):
            workers.add_metric([base], n)
        yield workers
        yield from _stored(session, self.settings)
        yield GaugeMetricFamily(
            "tuneqdm_registry_up", "1 when the registry answered this scrape.", value=1
        )

    def _disk(self) -> Iterator[Metric]:
        if self.settings.storage_backend != "local":
            return  # the object store reports its own capacity
        folder = Path(self.settings.resolved_storage_dir)
        try:
            usage = shutil.disk_usage(folder)
        except OSError as exc:
            log.error("metrics: %s not readable: %s", folder, exc)
            return
        yield GaugeMetricFamily(
            "tuneqdm_storage_free_bytes",
            "Free bytes on the disk that holds the local storage folder.",
            value=usage.free,
        )
        yield GaugeMetricFamily(
            "tuneqdm_storage_size_bytes",
            "Size in bytes of the disk that holds the local storage folder.",
            value=usage.total,
        )


def _aware(value: Any) -> Any:
    # SQLite hands back naive datetimes (or text) for aggregates; every stored time is UTC.
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def _stored(session: Session, settings: Settings) -> Iterator[Metric]:
    """Bytes each tenant stores (the sum app/services/quotas.py limits), and its limit."""
    by_job = (
        (FinetuneImage.size_bytes, FinetuneImage.job_id, FinetuneJob),
        (FinetuneSample.size_bytes, FinetuneSample.job_id, FinetuneJob),
        (FinetuneCheckpoint.size_bytes, FinetuneCheckpoint.job_id, FinetuneJob),
        (GeneratedImage.size_bytes, GeneratedImage.generation_id, GenerationJob),
    )
    used: dict[str, int] = {}
    for size, job_id, model in by_job:
        for tenant, n in session.execute(
            select(model.tenant_id, func.coalesce(func.sum(size), 0))
            .join(model, model.id == job_id)
            .group_by(model.tenant_id)
        ):
            used[tenant] = used.get(tenant, 0) + int(n)
    for tenant, n in session.execute(
        select(Adapter.tenant_id, func.coalesce(func.sum(Adapter.size_bytes), 0)).group_by(
            Adapter.tenant_id
        )
    ):
        used[tenant] = used.get(tenant, 0) + int(n)
    stored = GaugeMetricFamily(
        "tuneqdm_tenant_stored_bytes",
        "Bytes a tenant stores (photos, adapters, progress and generated images, checkpoints).",
        labels=["tenant"],
    )
    limit = GaugeMetricFamily(
        "tuneqdm_tenant_stored_bytes_limit",
        "A tenant's stored-bytes limit (TUNEQDM_TENANT_STORED_BYTES or its own); 0: none.",
        labels=["tenant"],
    )
    for tenant_id, name, own in session.execute(
        select(Tenant.id, Tenant.name, Tenant.stored_bytes_limit)
    ):
        stored.add_metric([name], used.get(tenant_id, 0))
        limit.add_metric([name], own if own is not None else settings.tenant_stored_bytes)
    yield stored
    yield limit


def install(app: FastAPI) -> None:
    """Instrument `app`'s HTTP handlers; each app gets its own registry (tests build many)."""
    from prometheus_fastapi_instrumentator import Instrumentator

    registry = CollectorRegistry()
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).instrument(app)
    app.state.metrics_registry = registry


def render(app: FastAPI, *, session: Session, sender: TaskSender, settings: Settings) -> bytes:
    """The text exposition: HTTP metrics, the API's own events, then the gauges read now."""
    scraped = CollectorRegistry()
    scraped.register(RegistryCollector(session, sender, settings))
    return (
        generate_latest(app.state.metrics_registry)
        + generate_latest(EVENTS)
        + generate_latest(scraped)
    )
