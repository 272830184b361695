"""Webhook delivery: Standard Webhooks signatures (checked with the reference verifier), secret
rotation, an overall deadline per attempt, one sender per attempt, nothing lost when a sender
dies, exhausted retries marked failed, addresses and ports re-checked at send time."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from sqlalchemy import select, update
from standardwebhooks import Webhook, WebhookVerificationError

from app.ids import new_id
from app.models import FinetuneEvent, FinetuneJob, GenerationJob, Tenant, WebhookDelivery, utcnow
from app.schemas import FinetunePublic
from app.services.finetunes import get_finetune
from app.services.webhook_secrets import current_secret, rotate_secret
from app.webhooks import tenant_webhook_secret, verify_webhook
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.finetunes import run_finetune
from worker.generations import run_generation
from worker.webhooks import (
    WebhookRefused,
    WebhookRetry,
    attempt_delivery,
    claim_attempt,
    deliver_for_job,
    post_json,
    sweep_deliveries,
)


class _Hook(BaseHTTPRequestHandler):
    status: ClassVar[int] = 204
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers.items()), body))
        self.send_response(self.status)
        if self.status in (301, 302, 307):
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[str]:
    _Hook.received = []
    _Hook.status = 204
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture
def open_ctx(ctx: Context) -> Context:
    """Deliveries to the loopback test receiver on its random port."""
    ctx.settings.allow_private_webhooks = True
    ctx.settings.webhook_ports = []
    return ctx


def _delivery(ctx: Context, tenant: Tenant, url: str, **values: Any) -> str:
    """A pending outbox row, as a job's final transaction leaves it."""
    row = WebhookDelivery(
        id=new_id("msg"),
        tenant_id=tenant.id,
        job_kind="generation",
        job_id=new_id("gen"),
        url=url,
        event="generation.succeeded",
        payload={"type": "generation.succeeded", "data": {"n": 1}},
        status="pending",
        attempts=0,
        next_attempt_at=utcnow(),
        **values,
    )
    with ctx.sessions() as s:
        s.add(row)
        s.commit()
    return row.id


def _row(ctx: Context, delivery_id: str) -> WebhookDelivery:
    with ctx.sessions() as s:
        row = s.get(WebhookDelivery, delivery_id)
        assert row is not None
        return row


def _make_due(ctx: Context, delivery_id: str) -> None:
    """Stands for time passing (a backoff, a dead sender's lease), without sleeping."""
    with ctx.sessions() as s:
        s.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )
        s.commit()


def test_loopback_is_refused_at_send_time_unless_allowed(hook: str) -> None:
    with pytest.raises(WebhookRefused, match="non-public"):
        post_json(hook, b"{}", {}, timeout=5, allow_private=False, ports=[])
    # A name that resolves to loopback is refused the same way (the API only saw the name).
    with pytest.raises(WebhookRefused, match="non-public"):
        post_json(
            hook.replace("127.0.0.1", "localhost"),
            b"{}",
            {},
            timeout=5,
            allow_private=False,
            ports=[],
        )
    assert _Hook.received == []
    assert post_json(hook, b"{}", {}, timeout=5, allow_private=True, ports=[]) == 204


@pytest.mark.parametrize(
    "host",
    ["[::ffff:127.0.0.1]", "[::7f00:1]", "[64:ff9b::7f00:1]", "[2002:7f00:1::1]", "[fec0::1]"],
)
def test_ipv6_forms_of_private_addresses_are_refused_at_send_time(host: str) -> None:
    with pytest.raises(WebhookRefused, match="non-public"):
        post_json(f"http://{host}/hook", b"{}", {}, timeout=5, allow_private=False, ports=[])


def test_ports_are_checked_at_send_time(hook: str) -> None:
    with pytest.raises(WebhookRefused, match="TUNEQDM_WEBHOOK_PORTS"):
        post_json(hook, b"{}", {}, timeout=5, allow_private=True, ports=[80, 443])
    assert _Hook.received == []


def test_redirects_are_not_followed_and_5xx_is_retried(hook: str) -> None:
    _Hook.status = 302
    with pytest.raises(WebhookRefused, match="302"):
        post_json(hook, b"{}", {}, timeout=5, allow_private=True, ports=[])
    assert len(_Hook.received) == 1
    _Hook.status = 503
    with pytest.raises(WebhookRetry, match="503"):
        post_json(hook, b"{}", {}, timeout=5, allow_private=True, ports=[])


class _Trickle(socketserver.BaseRequestHandler):
    """Reads the request, then answers one byte every 0.2 s (a 204 takes ~10 s): every socket
    read gets a byte long before any per-operation timeout."""

    finished: ClassVar[threading.Event]

    def handle(self) -> None:
        self.request.recv(65536)
        answer = (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nX-Pad: " + b"x" * 10 + b"\r\n\r\n"
        )
        try:
            for byte in answer:
                self.request.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            return  # the sender hung up
        self.finished.set()


def test_a_receiver_answering_one_byte_at_a_time_is_cut_at_the_deadline() -> None:
    _Trickle.finished = threading.Event()
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/slow"
    try:
        with pytest.raises(WebhookRetry, match="deadline"):
            post_json(url, b"{}", {}, timeout=1.0, allow_private=True, ports=[])
        # Cut while the receiver was still answering, not after it finished.
        assert not _Trickle.finished.is_set()
    finally:
        server.shutdown()
        server.server_close()


def test_a_receiver_that_never_answers_is_cut_at_the_deadline() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts connections in the backlog, never reads or answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/mute"
    try:
        with pytest.raises(WebhookRetry, match="deadline"):
            post_json(url, b"{}", {}, timeout=0.5, allow_private=True, ports=[])
    finally:
        listener.close()


def test_a_failed_job_is_delivered_in_the_standard_webhooks_format(
    open_ctx: Context, tenant: Tenant, hook: str
) -> None:
    ctx = open_ctx
    # method=full (no adapter to serve) fails at once: the failure and its delivery row commit
    # together.
    job_id = submit_finetune(ctx, tenant, '{"steps": 2, "method": "full"}', webhook_url=hook)
    assert run_finetune(job_id, ctx) == "failed"
    with ctx.sessions() as s:
        row = s.scalars(select(WebhookDelivery)).one()
    assert (row.job_id, row.status, row.attempts, row.event) == (
        job_id,
        "pending",
        0,
        "finetune.failed",
    )
    assert ctx.notify == [job_id]  # the first attempt is asked for at once

    attempt = deliver_for_job(job_id, settings=ctx.settings, sessions=ctx.sessions)
    assert attempt is not None and attempt.outcome == "delivered (204)"
    path, headers, body = _Hook.received[0]
    assert path == "/hook"
    secret = current_secret(ctx.settings, tenant)
    assert secret.startswith("whsec_")
    # The reference implementation of the standard accepts it...
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "finetune.failed" and payload["data"]["id"] == job_id
    assert "method=full" in payload["data"]["error"]
    assert headers["webhook-id"] == row.id and headers["webhook-signature"].startswith("v1,")
    # ...and refuses a changed body, another tenant's secret, or a replayed old timestamp.
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body + b" ", headers)
    other = tenant_webhook_secret(ctx.settings.resolved_secret_key, "tn_other")
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(body, headers)
    old = headers | {"webhook-timestamp": str(int(headers["webhook-timestamp"]) - 600)}
    with pytest.raises(WebhookVerificationError):
        Webhook(secret).verify(body, old)
    assert verify_webhook(secret, headers, body, now=time.time())

    # The job shows the delivery.
    with ctx.sessions() as s:
        shown = FinetunePublic.from_row(
            get_finetune(session=s, tenant=s.merge(tenant), finetune_id=job_id)
        ).webhook
    assert shown is not None and (shown.status, shown.attempts, shown.last_error) == (
        "delivered",
        1,
        None,
    )
    # Nothing pending is left to send.
    assert deliver_for_job(job_id, settings=ctx.settings, sessions=ctx.sessions) is None


def test_after_rotation_both_secrets_sign_until_the_overlap_ends(
    open_ctx: Context, tenant: Tenant, hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = open_ctx
    old = current_secret(ctx.settings, tenant)
    with ctx.sessions() as s, caplog.at_level("INFO", logger="tuneqdm.audit"):
        _, new = rotate_secret(session=s, settings=ctx.settings, name=tenant.name)
        s.commit()
    assert new != old and new.startswith("whsec_")
    audit = [r for r in caplog.records if r.name == "tuneqdm.audit"]
    assert len(audit) == 1 and audit[0].audit == "webhook_secret.rotate"  # type: ignore[attr-defined]
    assert audit[0].tenant_id == tenant.id  # type: ignore[attr-defined]
    assert old not in caplog.text and new not in caplog.text  # secrets are never logged

    first = _delivery(ctx, tenant, hook)
    assert attempt_delivery(first, settings=ctx.settings, sessions=ctx.sessions).outcome == (
        "delivered (204)"
    )
    _, headers, body = _Hook.received[-1]
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(body, headers)
    Webhook(new).verify(body, headers)

    # Once the overlap has passed, only the new secret signs.
    with ctx.sessions() as s:
        s.execute(
            update(Tenant)
            .where(Tenant.id == tenant.id)
            .values(
                webhook_secret_rotated_at=utcnow()
                - timedelta(seconds=ctx.settings.webhook_secret_overlap_s + 1)
            )
        )
        s.commit()
    second = _delivery(ctx, tenant, hook)
    attempt_delivery(second, settings=ctx.settings, sessions=ctx.sessions)
    _, headers, body = _Hook.received[-1]
    assert len(headers["webhook-signature"].split(" ")) == 1
    Webhook(new).verify(body, headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(old).verify(body, headers)


def test_each_attempt_has_exactly_one_sender(open_ctx: Context, tenant: Tenant, hook: str) -> None:
    ctx = open_ctx
    ids = [_delivery(ctx, tenant, hook) for _ in range(5)]
    # Four senders (sweeps of four workers, task kicks) go for the same rows at once.
    with ThreadPoolExecutor(8) as pool:
        barrier = threading.Barrier(4)

        def sender() -> list[str]:
            barrier.wait()
            return [
                attempt_delivery(i, settings=ctx.settings, sessions=ctx.sessions).outcome
                for i in ids
            ]

        outcomes = [f.result() for f in [pool.submit(sender) for _ in range(4)]]
    delivered = [o for run in outcomes for o in run if o.startswith("delivered")]
    assert len(delivered) == len(ids)
    assert sorted(h["webhook-id"] for _, h, _ in _Hook.received) == sorted(ids)
    assert all(_row(ctx, i).attempts == 1 for i in ids)


def test_a_sender_that_died_loses_nothing(open_ctx: Context, tenant: Tenant, hook: str) -> None:
    ctx = open_ctx
    delivery_id = _delivery(ctx, tenant, hook)
    with ctx.sessions() as s:
        # A sender claims the attempt and dies before sending (or before recording).
        assert claim_attempt(s, delivery_id, ctx.settings) == 1
    with ThreadPoolExecutor(2) as pool:
        # While its lease lasts nobody else sends it...
        assert sweep_deliveries(settings=ctx.settings, sessions=ctx.sessions, pool=pool) == {}
        assert _Hook.received == []
        # ...and once the lease has passed, the sweep does.
        _make_due(ctx, delivery_id)
        done = sweep_deliveries(settings=ctx.settings, sessions=ctx.sessions, pool=pool)
    assert done[delivery_id].outcome == "delivered (204)"
    row = _row(ctx, delivery_id)
    assert (row.status, row.attempts) == ("delivered", 2) and row.delivered_at is not None
    assert [h["webhook-id"] for _, h, _ in _Hook.received] == [delivery_id]


def test_exhausted_retries_mark_the_delivery_failed(
    open_ctx: Context, tenant: Tenant, hook: str
) -> None:
    ctx = open_ctx
    ctx.settings.webhook_max_retries = 2
    _Hook.status = 503
    delivery_id = _delivery(ctx, tenant, hook)
    outcomes = []
    for _ in range(3):
        attempt = attempt_delivery(delivery_id, settings=ctx.settings, sessions=ctx.sessions)
        outcomes.append(attempt.outcome)
        row = _row(ctx, delivery_id)
        if attempt.retry_in_s is not None:
            assert row.status == "pending" and row.next_attempt_at > utcnow()
            assert "503" in (row.last_error or "")
        # Not due before its backoff has passed.
        again = attempt_delivery(delivery_id, settings=ctx.settings, sessions=ctx.sessions)
        assert again.outcome.startswith("not due")
        _make_due(ctx, delivery_id)
    assert outcomes == ["retry", "retry", "failed"]
    row = _row(ctx, delivery_id)
    assert (row.status, row.attempts) == ("failed", 3)
    assert "503" in (row.last_error or "") and "gave up after 3 attempts" in (row.last_error or "")
    assert len(_Hook.received) == 3
    # A failed row is never sent again.
    with ThreadPoolExecutor(1) as pool:
        assert sweep_deliveries(settings=ctx.settings, sessions=ctx.sessions, pool=pool) == {}

    # A 4xx is final at once.
    _Hook.status = 410
    gone = _delivery(ctx, tenant, hook)
    assert attempt_delivery(gone, settings=ctx.settings, sessions=ctx.sessions).outcome == "failed"
    assert "410" in (_row(ctx, gone).last_error or "")


def test_payload_is_sent_as_stored(open_ctx: Context, tenant: Tenant, hook: str) -> None:
    ctx = open_ctx
    delivery_id = _delivery(ctx, tenant, hook)
    attempt_delivery(delivery_id, settings=ctx.settings, sessions=ctx.sessions)
    _, headers, body = _Hook.received[0]
    assert json.loads(body) == {"type": "generation.succeeded", "data": {"n": 1}}
    assert headers["Content-Type"] == "application/json"


def test_every_finish_path_writes_its_delivery(ctx: Context, tenant: Tenant) -> None:
    """Fine-tune succeeded, generation succeeded, generation failed: each final state commits
    with its outbox row (and asks for a first attempt)."""
    hook = "https://hooks.example.com/tuneqdm"
    job_id = submit_finetune(
        ctx, tenant, '{"steps": 2, "resolution": 64, "seed": 1}', webhook_url=hook
    )
    assert run_finetune(job_id, ctx) == "succeeded"
    adapter_id = "ad_" + job_id.removeprefix("ft_")
    gens = []
    for adapter in (adapter_id, "ad_" + "0" * 32):
        with ctx.sessions() as s:
            gen = GenerationJob(
                id=new_id("gen"),
                tenant_id=tenant.id,
                adapter_id=adapter,
                base_model=ctx.settings.base_model,
                status="queued",
                prompt="a photo of sks dog",
                num_images=1,
                steps=2,
                guidance_scale=7.5,
                seed=3,
                width=32,
                height=32,
                scheduler="ddim",
                webhook_url=hook,
            )
            s.add(gen)
            s.commit()
            gens.append(gen.id)
    ctx.settings.generation_batch_size = 1
    assert run_generation(gens[0], ctx).startswith("succeeded")
    assert run_generation(gens[1], ctx) == "failed"  # its adapter does not exist
    with ctx.sessions() as s:
        rows = {r.job_id: r for r in s.scalars(select(WebhookDelivery))}
    assert set(rows) == {job_id, *gens}
    assert ctx.notify == [job_id, *gens]
    done = rows[job_id].payload
    assert done["type"] == "finetune.succeeded" and done["data"]["adapter_id"] == adapter_id
    assert done["data"]["progress"] == {"step": 2, "total": 2}
    made = rows[gens[0]].payload
    assert made["type"] == "generation.succeeded"
    assert made["data"]["images"] == [
        {"index": 0, "seed": 3, "base": False, "url": f"/v1/generations/{gens[0]}/images/0"}
    ]
    failed = rows[gens[1]].payload
    assert failed["type"] == "generation.failed" and "deleted" in failed["data"]["error"]
    assert all(r.status == "pending" and r.url == hook for r in rows.values())


def test_a_fine_tunes_delivery_attempts_are_in_its_event_log(
    open_ctx: Context, tenant: Tenant, hook: str
) -> None:
    ctx = open_ctx
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}', webhook_url=hook)
    with ctx.sessions() as s:  # a width the worker's base is not served at: the job fails
        job = s.get(FinetuneJob, job_id)
        assert job is not None
        job.params = {**job.params, "bits": 8}
        s.commit()
    assert run_finetune(job_id, ctx) == "failed"
    _Hook.status = 503
    assert deliver_for_job(job_id, settings=ctx.settings, sessions=ctx.sessions) is not None
    with ctx.sessions() as s:
        delivery_id = s.scalars(select(WebhookDelivery.id)).one()
    _make_due(ctx, delivery_id)
    _Hook.status = 204
    assert attempt_delivery(delivery_id, settings=ctx.settings, sessions=ctx.sessions).outcome == (
        "delivered (204)"
    )
    with ctx.sessions() as s:
        events = s.scalars(
            select(FinetuneEvent).where(FinetuneEvent.job_id == job_id).order_by(FinetuneEvent.id)
        ).all()
    assert [e.type for e in events] == ["queued", "running", "failed", "webhook", "webhook"]
    assert "bits=4" in (events[2].data["error"] or "")
    attempts = [(e.data["attempt"], e.data["outcome"]) for e in events[3:]]
    assert attempts == [(1, "retry"), (2, "delivered")]
    assert "503" in events[3].data["error"] and events[4].data["error"] is None
    assert {e.data["delivery_id"] for e in events[3:]} == {delivery_id}
