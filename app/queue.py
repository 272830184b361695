"""Enqueueing by task name: the API knows the worker's task names, never its code.

Called only after the database commit, so a worker that picks the message up always finds the
row (docs/design.md, Celery's guidance).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Protocol

from app.errors import ServiceUnavailable

FINETUNE_TASK = "tuneqdm.finetune"
GENERATE_TASK = "tuneqdm.generate"
# Job kinds: each base has one queue of each, `<kind>.<base>` (base_queue), since a worker
# holds one base; a worker's `-Q finetune,generate` means its own base's two queues.
FINETUNE_QUEUE = "finetune"
GENERATE_QUEUE = "generate"
# Exports run where generations run: a worker that holds the adapter's quantized base.
EXPORT_TASK = "tuneqdm.export"
# Not per base: delivering a webhook needs no model.
WEBHOOK_QUEUE = "webhooks"

_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def queue_safe(base: str) -> str:
    """The base's part of its queue names. A name of lowercase letters, digits, '-' and '_'
    stays as it is; any other is reduced to those characters and given a short hash of the
    whole name, so two bases never share a queue ('a/b' and 'a-b' differ) and the queue name
    has no '.', ',' (a -Q list) or '/'."""
    slug = _UNSAFE.sub("-", base.lower()).strip("-")[:80]
    if slug == base:
        return slug
    return f"{slug}-{hashlib.sha256(base.encode()).hexdigest()[:8]}"


def base_queue(kind: str, base: str) -> str:
    """The queue of `kind` (FINETUNE_QUEUE or GENERATE_QUEUE) jobs on `base`."""
    return f"{kind}.{queue_safe(base)}"


def queues_of(bases: Iterable[str]) -> list[str]:
    """Every queue of these bases plus the webhooks queue (the queue-depth metric)."""
    return [base_queue(k, b) for b in bases for k in (FINETUNE_QUEUE, GENERATE_QUEUE)] + [
        WEBHOOK_QUEUE
    ]


class TaskSender(Protocol):
    def send(self, task: str, object_id: str, *, queue: str) -> None:
        """Publish `task(object_id)` to `queue`; raise ServiceUnavailable when that fails."""

    def ping(self) -> None:
        """Raise ServiceUnavailable when the broker is not reachable."""

    def queue_sizes(self, queues: Iterable[str]) -> dict[str, int]:
        """Messages waiting in each queue; raise ServiceUnavailable when the broker is down."""


class CelerySender:
    def __init__(self, broker_url: str, *, timeout_s: float = 3.0) -> None:
        # Imported here so importing app.queue (e.g. for the task names) stays cheap.
        from celery import Celery

        self.broker_url = broker_url
        self.timeout_s = timeout_s
        self.celery = Celery("tuneqdm-api", broker=broker_url)
        self.celery.conf.broker_connection_timeout = timeout_s
        self.celery.conf.broker_connection_retry_on_startup = False

    def send(self, task: str, object_id: str, *, queue: str) -> None:
        try:
            self.celery.send_task(
                task,
                args=[object_id],
                queue=queue,
                # A few quick retries, then give up: the request must not hang on a dead broker.
                retry=True,
                retry_policy={
                    "max_retries": 2,
                    "interval_start": 0,
                    "interval_step": 0.2,
                    "interval_max": 0.5,
                },
            )
        except Exception as exc:
            raise ServiceUnavailable(
                f"the task queue is not reachable ({type(exc).__name__}); nothing was stored, "
                "retry the request later"
            ) from exc

    def ping(self) -> None:
        from kombu import Connection

        try:
            with Connection(self.broker_url, connect_timeout=self.timeout_s) as conn:
                conn.ensure_connection(max_retries=1, timeout=self.timeout_s)
        except Exception as exc:
            raise ServiceUnavailable(f"broker not reachable: {type(exc).__name__}") from exc

    def queue_sizes(self, queues: Iterable[str]) -> dict[str, int]:
        from kombu import Connection
        from kombu.exceptions import ChannelError

        sizes: dict[str, int] = {}
        try:
            with Connection(self.broker_url, connect_timeout=self.timeout_s) as conn:
                conn.ensure_connection(max_retries=1, timeout=self.timeout_s)
                channel = conn.default_channel
                for queue in queues:
                    try:
                        # Passive: count without creating. Redis has no key for an empty queue.
                        sizes[queue] = int(channel.queue_declare(queue, passive=True).message_count)
                    except ChannelError:
                        sizes[queue] = 0
        except Exception as exc:
            raise ServiceUnavailable(f"broker not reachable: {type(exc).__name__}") from exc
        return sizes
