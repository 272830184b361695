"""Webhook delivery: send the outbox rows (app/outbox.py), signed, each attempt under a deadline,
a job's rows in the order of its events (a row waits while an earlier one of its job is pending).

Each attempt is claimed with one conditional UPDATE (the row is pending, due, and its attempt
counter is what the sender read) that counts the attempt and leases the row until the attempt's
deadline has surely passed; only the claimer sends, and it records the outcome only while its
claim still stands. A sender that dies leaves the row due again when the lease ends, and the
next sweep sends it: a webhook is delivered at least once (receivers drop repeats by
`webhook-id`), never lost, and its exhausted retries mark the row failed. Due times and leases
are the database's clock (app.db.sql_now), so senders whose clocks disagree still agree on them.

The API checked the URL's literal host only; here the host is resolved at send time, every
address it resolves to must be public (`app.webhooks.is_forbidden_address`, unless
TUNEQDM_ALLOW_PRIVATE_WEBHOOKS), and the connection goes to exactly the address that was
checked (no second lookup for DNS rebinding to race). Redirects are never followed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from app.db import database_now, sql_now
from app.events import lock_job, record_event
from app.models import Tenant, WebhookDelivery
from app.outbound import PinnedHTTP, PinnedHTTPS, first_forbidden
from app.settings import Settings
from app.webhooks import check_port, signing_secrets, webhook_headers
from worker import metrics

log = logging.getLogger(__name__)

# Host name lookups run here so that a hanging resolver counts against the attempt's deadline.
_resolver = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook-dns")


class WebhookRefused(Exception):
    """Never retried: the address or port is not allowed, or the receiver answered 3xx/4xx."""


class WebhookRetry(Exception):
    """Worth retrying later: network errors, the deadline, 429 and 5xx."""


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise WebhookRetry(f"no answer within the {self.seconds:g} s deadline")
        return remaining


def resolve_checked(host: str, port: int, *, allow_private: bool, deadline: _Deadline) -> str:
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(timeout=deadline.left())
    except FutureTimeout:
        raise WebhookRetry(f"resolving {host} took longer than the deadline") from None
    except socket.gaierror as exc:
        raise WebhookRetry(f"cannot resolve {host}: {exc}") from exc
    addresses = [str(info[4][0]) for info in infos]
    bad = None if allow_private else first_forbidden(addresses)
    if bad is not None:
        raise WebhookRefused(f"{host} resolves to a non-public address ({bad})")
    return addresses[0]


def _cut(conn: http.client.HTTPConnection, expired: threading.Event) -> None:
    """At the deadline: shut the socket down, which wakes a read blocked on a slow receiver
    (a socket timeout alone restarts with every byte that arrives)."""
    expired.set()
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: nothing to cut
            sock.shutdown(socket.SHUT_RDWR)


def post_json(
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    timeout: float,
    allow_private: bool,
    ports: Collection[int],
) -> int:
    """POST `body`; the whole attempt (lookup, connect, TLS, request, status line and headers of
    the answer) ends within `timeout` seconds."""
    deadline = _Deadline(timeout)
    parts = urlsplit(url)
    host = parts.hostname or ""
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    refused = check_port(port, ports)
    if refused is not None:
        raise WebhookRefused(refused)
    ip = resolve_checked(host, port, allow_private=allow_private, deadline=deadline)
    conn: http.client.HTTPConnection = (PinnedHTTPS if https else PinnedHTTP)(
        host, port, ip, deadline.left()
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    expired = threading.Event()
    watchdog = threading.Timer(deadline.left(), _cut, args=(conn, expired))
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.connect()
        if expired.is_set():  # the timer fired before connect() made the socket it would cut
            raise WebhookRetry(f"connecting to {host} took the whole {timeout:g} s deadline")
        conn.request("POST", path, body=body, headers=headers)
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # A socket timeout is the deadline too: each socket operation may wait at most what
        # was left of it, so under load it can fire just before the watchdog does.
        if expired.is_set() or isinstance(exc, TimeoutError):
            raise WebhookRetry(
                f"POST to {host} did not complete within the {timeout:g} s deadline"
            ) from exc
        raise WebhookRetry(f"POST to {host} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        watchdog.cancel()
        conn.close()
    if 200 <= status < 300:
        return status
    if status == 429 or status >= 500:
        raise WebhookRetry(f"{host} answered {status}")
    # 3xx included: following a redirect could lead into a private network.
    raise WebhookRefused(f"{host} answered {status}; not retried")


def lease_s(settings: Settings) -> float:
    """How long a claimed attempt keeps its row: past the attempt's deadline, with room for the
    claimer to record the outcome, so a live sender's row is never sent twice at once."""
    return 2 * settings.webhook_timeout_s + 30


def backoff_s(settings: Settings, attempts: int) -> float:
    return float(settings.webhook_backoff_s * 2 ** (attempts - 1))


def _first_of_its_job() -> ColumnElement[bool]:
    """No earlier delivery of the same job is still pending: a job's webhooks go out in the
    order of its events (app/outbox.py), each retried before the next is sent."""
    earlier = aliased(WebhookDelivery)
    return ~(
        select(earlier.id)
        .where(
            earlier.job_id == WebhookDelivery.job_id,
            earlier.sequence < WebhookDelivery.sequence,
            earlier.status == "pending",
        )
        .exists()
    )


def claim_attempt(session: Session, delivery_id: str, settings: Settings) -> int | None:
    """Claim the next attempt of a due delivery; its attempt number, or None if not ours."""
    seen = session.scalar(select(WebhookDelivery.attempts).where(WebhookDelivery.id == delivery_id))
    if seen is None:
        return None
    # The database's clock for the due time and the lease: a sender whose clock runs fast would
    # otherwise take a delivery whose attempt is still in flight elsewhere, a slow one hold back
    # due ones by its skew.
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.next_attempt_at <= sql_now(session),
            WebhookDelivery.attempts == seen,
            _first_of_its_job(),
        )
        .values(
            attempts=seen + 1,
            next_attempt_at=sql_now(session, lease_s(settings)),
            updated_at=sql_now(session),
        )
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return seen + 1 if result.rowcount else None  # type: ignore[attr-defined]


def _record(
    session: Session,
    delivery_id: str,
    attempt: int,
    *,
    finetune_id: str | None = None,
    outcome: str = "",
    retry_in_s: float | None = None,
    **values: object,
) -> bool:
    """Write an attempt's outcome only while the claim still stands; a fine-tune's delivery
    also adds it to the job's event log (when the job still exists). A retry is due again
    `retry_in_s` from now, by the database's clock."""
    if retry_in_s is not None:
        values["next_attempt_at"] = sql_now(session, retry_in_s)
    if values.get("status") == "delivered":
        values["delivered_at"] = sql_now(session)
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == "pending",
            WebhookDelivery.attempts == attempt,
        )
        .values(updated_at=sql_now(session), **values)
        .execution_options(synchronize_session=False)
    )
    recorded = bool(result.rowcount)  # type: ignore[attr-defined]
    if recorded and finetune_id is not None and lock_job(session, finetune_id):
        error = values.get("last_error")
        record_event(
            session,
            finetune_id,
            "webhook",
            delivery_id=delivery_id,
            attempt=attempt,
            outcome=outcome,
            error=error,
        )
    session.commit()
    return recorded


@dataclass(frozen=True)
class Attempt:
    outcome: str
    retry_in_s: float | None = None  # set when the delivery is due again later


def attempt_delivery(
    delivery_id: str, *, settings: Settings, sessions: sessionmaker[Session]
) -> Attempt:
    """One attempt of one delivery, if it is due and this call wins its claim."""
    with sessions() as session:
        attempt = claim_attempt(session, delivery_id, settings)
        if attempt is None:
            return Attempt("not due (or another sender has it)")
        row = session.get(WebhookDelivery, delivery_id)
        tenant = session.get(Tenant, row.tenant_id) if row is not None else None
        if row is None or tenant is None:
            return Attempt("gone")
        url, payload = row.url, row.payload
        finetune_id = row.job_id if row.job_kind == "finetune" else None
        # The signed timestamp too: receivers check it against their (correct) clocks.
        now = database_now(session)
        secrets = signing_secrets(
            settings.resolved_secret_key,
            tenant.id,
            version=tenant.webhook_secret_version,
            rotated_at=tenant.webhook_secret_rotated_at,
            overlap_s=settings.webhook_secret_overlap_s,
            now=now,
        )
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "tuneqdm-webhooks/2",
        **webhook_headers(secrets, delivery_id, int(now.timestamp()), body),
    }
    posting = time.perf_counter()
    try:
        status = post_json(
            url,
            body,
            headers,
            timeout=settings.webhook_timeout_s,
            allow_private=settings.allow_private_webhooks,
            ports=settings.webhook_ports,
        )
    except WebhookRefused as exc:
        result = Attempt("failed")
        values: dict[str, object] = {"status": "failed", "last_error": str(exc)}
    except WebhookRetry as exc:
        if attempt > settings.webhook_max_retries:
            error = f"{exc} (gave up after {attempt} attempts)"
            result, values = Attempt("failed"), {"status": "failed", "last_error": error}
        else:
            delay = backoff_s(settings, attempt)
            result = Attempt("retry", retry_in_s=delay)
            values = {"last_error": str(exc)}
    else:
        result = Attempt(f"delivered ({status})")
        values = {"status": "delivered", "last_error": None}
    outcome = result.outcome.split(" ")[0]  # delivered, retry or failed
    metrics.webhook_attempt(outcome, time.perf_counter() - posting)
    with sessions() as session:
        if not _record(
            session,
            delivery_id,
            attempt,
            finetune_id=finetune_id,
            outcome=outcome,
            retry_in_s=result.retry_in_s,
            **values,
        ):
            return Attempt("outcome not recorded (claim expired)")
    if result.outcome == "failed":
        log.warning("webhook %s failed: %s", delivery_id, values["last_error"])
    return result


# Deliveries one kick sends in a row for a job (its backlog of progress webhooks, then its
# final state's); what is left, the sweep sends.
_KICK_MAX = 100


def deliver_for_job(
    job_id: str, *, settings: Settings, sessions: sessionmaker[Session]
) -> Attempt | None:
    """Attempts of the job's pending deliveries, first in order first, as long as each is
    delivered (None: nothing pending); the last attempt's outcome."""
    result = None
    for _ in range(_KICK_MAX):
        with sessions() as session:
            delivery_id = session.scalar(
                select(WebhookDelivery.id)
                .where(WebhookDelivery.job_id == job_id, WebhookDelivery.status == "pending")
                .order_by(WebhookDelivery.sequence)
                .limit(1)
            )
        if delivery_id is None:
            return result
        result = attempt_delivery(delivery_id, settings=settings, sessions=sessions)
        if not result.outcome.startswith(("delivered", "failed")):
            return result
    return result


def due_deliveries(session: Session, *, limit: int = 100) -> list[str]:
    return list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(
                WebhookDelivery.status == "pending",
                WebhookDelivery.next_attempt_at <= sql_now(session),
                _first_of_its_job(),
            )
            .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.sequence)
            .limit(limit)
        )
    )


def sweep_deliveries(
    *, settings: Settings, sessions: sessionmaker[Session], pool: ThreadPoolExecutor
) -> dict[str, Attempt]:
    """Attempt every due delivery, `settings.webhook_senders` at a time (a slow receiver holds
    one sender for at most the deadline). Returns {delivery id: outcome}."""
    with sessions() as session:
        ids = due_deliveries(session)
    futures = {i: pool.submit(_send_in_order, i, settings=settings, sessions=sessions) for i in ids}
    return {i: f.result() for i, f in futures.items()}


def _send_in_order(
    delivery_id: str, *, settings: Settings, sessions: sessionmaker[Session]
) -> Attempt:
    """An attempt of a due delivery; once it is done with, the job's deliveries behind it
    (which waited for it) follow at once rather than one per sweep."""
    result = attempt_delivery(delivery_id, settings=settings, sessions=sessions)
    if result.outcome.startswith(("delivered", "failed")):
        with sessions() as session:
            job_id = session.scalar(
                select(WebhookDelivery.job_id).where(WebhookDelivery.id == delivery_id)
            )
        if job_id is not None:
            deliver_for_job(job_id, settings=settings, sessions=sessions)
    return result


class DeliverySweeper:
    """Sends due deliveries every TUNEQDM_SWEEP_EVERY_S: at worker start (what a crash left
    pending), and whatever a job's own kick (the webhook task) missed."""

    def __init__(self, settings: Settings, sessions: Callable[[], sessionmaker[Session]]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, name="webhook-sweep", daemon=True).start()

    def _run(self) -> None:
        with ThreadPoolExecutor(self.settings.webhook_senders, "webhook-send") as pool:
            while True:
                try:
                    sweep_deliveries(settings=self.settings, sessions=self.sessions(), pool=pool)
                except Exception:
                    log.exception("webhook sweep failed; trying again later")
                if self.stop.wait(self.settings.sweep_every_s):
                    return
