"""Webhook delivery: signed, re-checked address at send time, no redirects, retry on 5xx."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from sqlalchemy import update

from app.models import FinetuneJob, Tenant
from app.webhooks import SIGNATURE_HEADER, tenant_webhook_secret, verify_webhook
from tests.worker.conftest import submit_finetune
from worker.finetunes import Context
from worker.webhooks import WebhookRefused, WebhookRetry, deliver_finetune_webhook, post_json


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


def test_loopback_is_refused_at_send_time_unless_allowed(hook: str) -> None:
    with pytest.raises(WebhookRefused, match="non-public"):
        post_json(hook, b"{}", {}, timeout=5, allow_private=False)
    # A name that resolves to loopback is refused the same way (the API only saw the name).
    with pytest.raises(WebhookRefused, match="non-public"):
        post_json(hook.replace("127.0.0.1", "localhost"), b"{}", {}, timeout=5, allow_private=False)
    assert _Hook.received == []
    assert post_json(hook, b"{}", {}, timeout=5, allow_private=True) == 204


def test_redirects_are_not_followed_and_5xx_is_retried(hook: str) -> None:
    _Hook.status = 302
    with pytest.raises(WebhookRefused, match="302"):
        post_json(hook, b"{}", {}, timeout=5, allow_private=True)
    assert len(_Hook.received) == 1
    _Hook.status = 503
    with pytest.raises(WebhookRetry, match="503"):
        post_json(hook, b"{}", {}, timeout=5, allow_private=True)


def test_delivery_is_signed_with_the_tenants_secret(
    ctx: Context, tenant: Tenant, hook: str
) -> None:
    ctx.settings.allow_private_webhooks = True
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}', webhook_url=hook)
    with ctx.sessions() as s:
        s.execute(update(FinetuneJob).values(status="failed", error="the GPU ran out of memory"))
        s.commit()
    outcome = deliver_finetune_webhook(job_id, settings=ctx.settings, sessions=ctx.sessions)
    assert outcome == "delivered (204)"
    path, headers, body = _Hook.received[0]
    secret = tenant_webhook_secret(ctx.settings.resolved_secret_key, tenant.id)
    assert path == "/hook" and verify_webhook(secret, headers[SIGNATURE_HEADER], body)
    assert not verify_webhook(secret, headers[SIGNATURE_HEADER], body + b" ")
    other = tenant_webhook_secret(ctx.settings.resolved_secret_key, "tn_other")
    assert not verify_webhook(other, headers[SIGNATURE_HEADER], body)
    assert b'"type": "finetune.failed"' in body and b"ran out of memory" in body
