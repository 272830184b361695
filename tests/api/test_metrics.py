"""GET /metrics: HTTP metrics, the API's own events and the gauges read from the registry and
the broker."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from app import metrics
from app.models import BaseWorker, ServedBase, utcnow
from app.queue import FINETUNE_QUEUE, GENERATE_QUEUE, base_queue
from app.settings import Settings
from app.storage import LocalStorage
from tests.api.factories import (
    RecordingSender,
    image_bytes,
    make_finetune,
    make_generation,
    make_tenant,
)


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_jobs_queues_workers_storage_and_http(
    client: TestClient,
    session: Session,
    storage: LocalStorage,
    sender: RecordingSender,
    settings: Settings,
) -> None:
    t = make_tenant(session)
    now = utcnow()
    base = "tuneqdm/fashion-sd"
    make_finetune(session, t.tenant, started_at=now - timedelta(hours=1), finished_at=now)
    make_finetune(session, t.tenant, status="running")
    # Queued for 100 s: the oldest queued fine-tune of its base.
    make_finetune(session, t.tenant, status="queued", created_at=now - timedelta(seconds=100))
    make_generation(session, storage, t.tenant, images=1)
    # One worker seen now, one gone for an hour: one is up.
    session.add(
        ServedBase(name=base, source="x", native_resolution=64, prediction_type="epsilon", bits=4)
    )
    session.add(BaseWorker(base_name=base, worker="a:1", last_seen_at=now))
    session.add(BaseWorker(base_name=base, worker="b:2", last_seen_at=now - timedelta(hours=1)))
    session.commit()
    photo = image_bytes()
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        files=[("images", ("a.png", photo, "image/png"))],
        data={"instance_prompt": "a photo of sks dog"},
    )
    assert r.status_code == 202, r.text

    m = _samples(client)
    active = (("base", base), ("kind", "finetune"), ("status", "queued"))
    assert m[("tuneqdm_jobs_active", active)] == 2
    assert (
        m[("tuneqdm_jobs_active", (("base", base), ("kind", "finetune"), ("status", "running")))]
        == 1
    )
    gen_queued = (("base", base), ("kind", "generation"), ("status", "queued"))
    assert m[("tuneqdm_jobs_active", gen_queued)] == 0
    # Finished jobs are not a gauge here: the workers count them (tuneqdm_jobs_finished_total).
    assert not any(name == "tuneqdm_jobs" for name, _ in m)
    age = m[("tuneqdm_queue_oldest_age_seconds", (("base", base), ("kind", "finetune")))]
    assert 100 <= age < 160
    assert m[("tuneqdm_queue_oldest_age_seconds", (("base", base), ("kind", "generation")))] == 0
    assert m[("tuneqdm_workers_up", (("base", base),))] == 1
    # The default base's queues (app.queue.base_queue).
    finetune = base_queue(FINETUNE_QUEUE, base)
    assert finetune.startswith("finetune.tuneqdm-fashion-sd-")
    assert m[("tuneqdm_queue_messages", (("queue", finetune),))] == 1
    generate = base_queue(GENERATE_QUEUE, base)
    assert m[("tuneqdm_queue_messages", (("queue", generate),))] == 0
    assert m[("tuneqdm_broker_up", ())] == 1 and m[("tuneqdm_registry_up", ())] == 1
    # The stored photo (the generation factory's image counts too) and the default limit.
    tenant = (("tenant", t.tenant.name),)
    assert m[("tuneqdm_tenant_stored_bytes", tenant)] >= len(photo)
    limit = settings.tenant_stored_bytes
    assert m[("tuneqdm_tenant_stored_bytes_limit", tenant)] == limit
    assert 0 < m[("tuneqdm_storage_free_bytes", ())] <= m[("tuneqdm_storage_size_bytes", ())]
    assert m[("tuneqdm_build_info", (("version", metrics.version()),))] == 1
    # The instrumentator counts requests by handler template, not by concrete path.
    posts = ("method", "POST"), ("handler", "/v1/finetunes"), ("status", "2xx")
    assert m[("http_requests_total", tuple(sorted(posts)))] == 1


def test_cancels_are_counted_by_the_api(
    client: TestClient, session: Session, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    job = make_finetune(session, t.tenant, status="queued")
    labels = (
        ("base", job.base_model),
        ("cause", "request"),
        ("kind", "finetune"),
        ("status", "canceled"),
    )
    before = _samples(client).get(("tuneqdm_jobs_finished_total", labels), 0.0)
    r = client.post(f"/v1/finetunes/{job.id}/cancel", headers=t.headers)
    assert r.status_code == 200, r.text
    assert _samples(client)[("tuneqdm_jobs_finished_total", labels)] == before + 1
    # A second cancel changes nothing and counts nothing.
    assert client.post(f"/v1/finetunes/{job.id}/cancel", headers=t.headers).status_code == 409
    assert _samples(client)[("tuneqdm_jobs_finished_total", labels)] == before + 1


def test_broker_down_still_answers(
    client: TestClient, session: Session, sender: RecordingSender
) -> None:
    sender.fail = True
    m = _samples(client)
    assert m[("tuneqdm_broker_up", ())] == 0
    assert not any(name == "tuneqdm_queue_messages" for name, _ in m)
    assert m[("tuneqdm_registry_up", ())] == 1


def test_metrics_and_page_stay_out_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/metrics" not in paths and "/" not in paths
