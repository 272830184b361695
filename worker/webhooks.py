"""Webhook delivery: a signed POST when a fine-tune ends, retried with backoff by its own task.

The API checked the URL's literal host only; here the host is resolved at send time, every
address it resolves to must be public (`app.webhooks.is_forbidden_address`, unless
TUNEQDM_ALLOW_PRIVATE_WEBHOOKS), and the connection goes to exactly the address that was
checked (no second lookup for DNS rebinding to race). Redirects are never followed.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.orm import Session, sessionmaker

from app.models import FinetuneJob
from app.settings import Settings
from app.webhooks import SIGNATURE_HEADER, is_forbidden_address, sign_webhook, tenant_webhook_secret

log = logging.getLogger(__name__)


class WebhookRefused(Exception):
    """Never retried: the address is not allowed, or the receiver answered 3xx/4xx."""


class WebhookRetry(Exception):
    """Worth retrying later: network errors, timeouts, 429 and 5xx."""


def resolve_checked(host: str, port: int, *, allow_private: bool) -> str:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookRetry(f"cannot resolve {host}: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    if not allow_private:
        bad = [a for a in addresses if is_forbidden_address(ipaddress.ip_address(a.split("%")[0]))]
        if bad:
            raise WebhookRefused(f"{host} resolves to a non-public address ({bad[0]})")
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self.ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self.ip, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self.ip, self.port), self.timeout)
        # Certificate and SNI are checked against the host name, not the pinned address.
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post_json(
    url: str, body: bytes, headers: dict[str, str], *, timeout: float, allow_private: bool
) -> int:
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    ip = resolve_checked(host, port, allow_private=allow_private)
    conn: http.client.HTTPConnection = (_PinnedHTTPS if https else _PinnedHTTP)(
        host, port, ip, timeout
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", path, body=body, headers=headers)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        raise WebhookRetry(f"POST to {host} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
    if 200 <= status < 300:
        return status
    if status == 429 or status >= 500:
        raise WebhookRetry(f"{host} answered {status}")
    # 3xx included: following a redirect could lead into a private network.
    raise WebhookRefused(f"{host} answered {status}; not retried")


def finetune_payload(job: FinetuneJob) -> dict[str, Any]:
    return {
        "type": f"finetune.{job.status}",
        "finetune_id": job.id,
        "status": job.status,
        "adapter_id": job.adapter.id if job.adapter is not None else None,
        "error": job.error,
        "progress": {"step": job.progress_step, "total": job.progress_total},
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
    }


def deliver_finetune_webhook(
    finetune_id: str, *, settings: Settings, sessions: sessionmaker[Session]
) -> str:
    """One delivery attempt; raises WebhookRetry when a later attempt may succeed."""
    with sessions() as session:
        job = session.get(FinetuneJob, finetune_id)
        if job is None or not job.webhook_url:
            return "no webhook"
        url = job.webhook_url
        body = json.dumps(finetune_payload(job), sort_keys=True).encode()
        secret = tenant_webhook_secret(settings.resolved_secret_key, job.tenant_id)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "tuneqdm-webhooks/1",
        SIGNATURE_HEADER: sign_webhook(secret, body),
    }
    try:
        status = post_json(
            url,
            body,
            headers,
            timeout=settings.webhook_timeout_s,
            allow_private=settings.allow_private_webhooks,
        )
    except WebhookRefused as exc:
        log.warning("webhook of %s not delivered: %s", finetune_id, exc)
        return f"refused: {exc}"
    return f"delivered ({status})"
