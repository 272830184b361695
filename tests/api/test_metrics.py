"""GET /metrics: Prometheus text with HTTP metrics and the gauges read from the registry."""

from __future__ import annotations

from datetime import timedelta

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session

from app.models import utcnow
from app.queue import FINETUNE_QUEUE, GENERATE_QUEUE, base_queue
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


def test_jobs_queues_latencies_and_http(
    client: TestClient, session: Session, storage: LocalStorage, sender: RecordingSender
) -> None:
    t = make_tenant(session)
    now = utcnow()
    for seconds in (2.0, 4.0):
        make_finetune(
            session,
            t.tenant,
            started_at=now - timedelta(seconds=seconds * 400),
            finished_at=now,
        )
    make_finetune(session, t.tenant, status="running")
    # Finished before the window: counted by status, left out of the latencies.
    old = now - timedelta(hours=2)
    make_finetune(session, t.tenant, started_at=old - timedelta(hours=1), finished_at=old)
    gen = make_generation(session, storage, t.tenant, images=1)
    gen.started_at, gen.finished_at = now - timedelta(seconds=3), now
    gen.created_at = now - timedelta(seconds=4)
    session.commit()
    r = client.post(
        "/v1/finetunes",
        headers=t.headers,
        files=[("images", ("a.png", image_bytes(), "image/png"))],
        data={"instance_prompt": "a photo of sks dog"},
    )
    assert r.status_code == 202, r.text

    m = _samples(client)
    assert m[("tuneqdm_jobs", (("kind", "finetune"), ("status", "succeeded")))] == 3
    assert m[("tuneqdm_jobs", (("kind", "finetune"), ("status", "queued")))] == 1
    assert m[("tuneqdm_jobs", (("kind", "finetune"), ("status", "running")))] == 1
    assert m[("tuneqdm_jobs", (("kind", "generation"), ("status", "succeeded")))] == 1
    assert m[("tuneqdm_jobs", (("kind", "generation"), ("status", "failed")))] == 0
    # The default base's queues (app.queue.base_queue).
    finetune = base_queue(FINETUNE_QUEUE, "tuneqdm/fashion-sd")
    assert finetune.startswith("finetune.tuneqdm-fashion-sd-")
    assert m[("tuneqdm_queue_messages", (("queue", finetune),))] == 1
    generate = base_queue(GENERATE_QUEUE, "tuneqdm/fashion-sd")
    assert m[("tuneqdm_queue_messages", (("queue", generate),))] == 0
    assert m[("tuneqdm_broker_up", ())] == 1 and m[("tuneqdm_registry_up", ())] == 1
    # 400 steps each (the default): 2 and 4 seconds per step.
    assert m[("tuneqdm_finetune_step_seconds", (("quantile", "0.5"),))] == 3.0
    assert 3.0 < m[("tuneqdm_finetune_step_seconds", (("quantile", "0.9"),))] <= 4.0
    assert m[("tuneqdm_generation_seconds", (("quantile", "0.5"),))] == 3.0
    assert m[("tuneqdm_generation_queue_wait_seconds", (("quantile", "0.99"),))] == 1.0
    # The instrumentator counts requests by handler template, not by concrete path.
    posts = ("method", "POST"), ("handler", "/v1/finetunes"), ("status", "2xx")
    assert m[("http_requests_total", tuple(sorted(posts)))] == 1


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
