"""`webhook_events`: a fine-tune that asked for running, progress, samples and its final state
gets each from the real worker code, recorded with the event it tells and delivered in that
order to a real HTTP receiver; a delivery that keeps failing holds the job's later ones back."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from sqlalchemy import select, update

from app.ids import new_id
from app.models import GenerationJob, Tenant, WebhookDelivery, utcnow
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.finetunes import run_finetune
from worker.generations import run_generation
from worker.webhooks import deliver_for_job, sweep_deliveries


class _Receiver(BaseHTTPRequestHandler):
    status: ClassVar[int] = 204
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.status < 300:
            self.received.append(json.loads(body))
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.received = []
    _Receiver.status = 204
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


@pytest.fixture
def open_ctx(ctx: Context) -> Context:
    ctx.settings.allow_private_webhooks = True
    ctx.settings.webhook_ports = []
    ctx.settings.webhook_progress_every_s = 0  # every progress write may send one
    return ctx


PARAMS = json.dumps(
    {"steps": 4, "resolution": 32, "validation_prompts": ["sks dog"], "sample_every": 2}
)
EVENTS = ["running", "progress", "samples", "succeeded", "failed", "canceled"]


def _types(ctx: Context, job_id: str) -> list[str]:
    with ctx.sessions() as s:
        rows = s.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .order_by(WebhookDelivery.sequence)
        ).all()
    assert [r.sequence for r in rows] == list(range(len(rows)))
    return [r.event.removeprefix("finetune.") for r in rows]


def test_a_finetune_gets_the_events_it_asked_for_in_order(
    open_ctx: Context, tenant: Tenant, receiver: str
) -> None:
    ctx = open_ctx
    job_id = submit_finetune(ctx, tenant, PARAMS, webhook_url=receiver, webhook_events=EVENTS)
    assert run_finetune(job_id, ctx) == "succeeded"
    recorded = _types(ctx, job_id)
    assert recorded[0] == "running" and recorded[-1] == "succeeded"
    # Steps 0 (the plain base, before training), 2 and 4.
    assert "progress" in recorded and recorded.count("samples") == 3
    assert set(recorded) == {"running", "progress", "samples", "succeeded"}
    # The worker asked for each delivery when it recorded it.
    notified: list[str] = ctx.notify  # type: ignore[assignment]
    assert notified == [job_id] * len(recorded)

    attempt = deliver_for_job(job_id, settings=ctx.settings, sessions=ctx.sessions)
    assert attempt is not None and attempt.outcome == "delivered (204)"
    got = [p["type"].removeprefix("finetune.") for p in _Receiver.received]
    assert got == recorded
    steps = [p["data"]["progress"]["step"] for p in _Receiver.received]
    assert steps == sorted(steps)  # in the order they happened
    assert _Receiver.received[0]["data"]["status"] == "running"
    samples = [p["data"]["samples"] for p in _Receiver.received if p["type"].endswith("samples")]
    assert [[s["step"] for s in batch] for batch in samples] == [[0], [2], [4]]
    assert samples[1][0]["url"] == f"/v1/finetunes/{job_id}/samples/2/0"
    assert _Receiver.received[-1]["data"]["adapter_id"] is not None


def test_the_default_is_the_final_state_only(
    open_ctx: Context, tenant: Tenant, receiver: str
) -> None:
    job_id = submit_finetune(open_ctx, tenant, PARAMS, webhook_url=receiver)
    assert run_finetune(job_id, open_ctx) == "succeeded"
    assert _types(open_ctx, job_id) == ["succeeded"]


def test_a_failing_delivery_holds_back_the_later_ones(
    open_ctx: Context, tenant: Tenant, receiver: str
) -> None:
    ctx = open_ctx
    job_id = submit_finetune(
        ctx, tenant, PARAMS, webhook_url=receiver, webhook_events=["running", "succeeded"]
    )
    assert run_finetune(job_id, ctx) == "succeeded"
    assert _types(ctx, job_id) == ["running", "succeeded"]
    _Receiver.status = 503
    attempt = deliver_for_job(job_id, settings=ctx.settings, sessions=ctx.sessions)
    assert attempt is not None and attempt.outcome == "retry"
    # `running` waits for its retry; `succeeded`, due all along, is not sent before it.
    assert sweep_deliveries(settings=ctx.settings, sessions=ctx.sessions, pool=_pool()) == {}
    _Receiver.status = 204
    with ctx.sessions() as s:
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.job_id == job_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )
        s.commit()
    sweep_deliveries(settings=ctx.settings, sessions=ctx.sessions, pool=_pool())
    assert [p["type"] for p in _Receiver.received] == ["finetune.running", "finetune.succeeded"]


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(2, "test-send")


def test_a_generation_gets_running_then_its_final_state(
    open_ctx: Context, tenant: Tenant, receiver: str
) -> None:
    ctx = open_ctx
    with ctx.sessions() as s:
        gen = GenerationJob(
            id=new_id("gen"),
            tenant_id=tenant.id,
            adapter_id=None,
            base_model=ctx.settings.base_model,
            status="queued",
            prompt="a photo of a dog",
            num_images=1,
            steps=2,
            guidance_scale=7.5,
            seed=3,
            width=32,
            height=32,
            scheduler="ddim",
            webhook_url=receiver,
            webhook_events=["running", "succeeded"],
        )
        s.add(gen)
        s.commit()
        gen_id = gen.id
    assert run_generation(gen_id, ctx).startswith("succeeded")
    assert deliver_for_job(gen_id, settings=ctx.settings, sessions=ctx.sessions) is not None
    got = [(p["type"], p["data"]["status"]) for p in _Receiver.received]
    assert got == [("generation.running", "running"), ("generation.succeeded", "succeeded")]
    assert _Receiver.received[0]["data"]["attempt"] == 1
    assert len(_Receiver.received[1]["data"]["images"]) == 1
