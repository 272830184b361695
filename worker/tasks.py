"""Thin Celery tasks: take an id, hand it to worker.finetunes / worker.generations / webhooks.

A task that cannot reach the database does not acknowledge its message away: it is retried
with a doubling delay (TUNEQDM_DB_RETRY_S, at most a minute apart) for as long as it takes.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from app.queue import FINETUNE_TASK, GENERATE_TASK
from app.storage import LocalStorage
from worker.celery_app import (
    WEBHOOK_QUEUE,
    WEBHOOK_TASK,
    app,
    job_route,
    restart_stalled,
    sessions,
    settings,
)
from worker.finetunes import Context, run_finetune
from worker.generations import run_generation
from worker.runtime import get_runtime
from worker.webhooks import WebhookRetry, deliver_finetune_webhook

log = logging.getLogger(__name__)

DB_UNREACHABLE = (OperationalError, InterfaceError, DisconnectionError)
MAX_DB_RETRY_S = 60.0


def notify(finetune_id: str) -> None:
    """Queue the webhook; delivery (and its retries) never blocks training."""
    try:
        webhook.apply_async(args=[finetune_id], queue=WEBHOOK_QUEUE)
    except Exception:
        log.exception("could not queue the webhook of %s", finetune_id)


def requeue(model: Any, job_id: str) -> None:
    task, queue = job_route(model)
    app.send_task(task, args=[job_id], queue=queue)


def context() -> Context:
    return Context(
        settings=settings,
        sessions=sessions(),
        storage=LocalStorage(settings.resolved_storage_dir),
        runtime=get_runtime(settings),
        notify=notify,
        requeue=requeue,
        on_stall=restart_stalled,
    )


def _retry_later(task: Any, exc: Exception, object_id: str) -> Exception:
    delay = min(MAX_DB_RETRY_S, settings.db_retry_s * 2**task.request.retries)
    log.warning("%s: database not reachable (%s); retrying in %.0f s", object_id, exc, delay)
    return task.retry(exc=exc, countdown=delay)


@app.task(name=FINETUNE_TASK, bind=True, max_retries=None)
def finetune(self: Any, finetune_id: str) -> str:
    try:
        outcome = run_finetune(finetune_id, context())
    except DB_UNREACHABLE as exc:
        raise _retry_later(self, exc, finetune_id) from exc
    log.info("fine-tune %s: %s", finetune_id, outcome)
    return outcome


@app.task(name=GENERATE_TASK, bind=True, max_retries=None)
def generate(self: Any, generation_id: str) -> str:
    try:
        outcome = run_generation(generation_id, context())
    except DB_UNREACHABLE as exc:
        raise _retry_later(self, exc, generation_id) from exc
    log.info("generation %s: %s", generation_id, outcome)
    return outcome


@app.task(name=WEBHOOK_TASK, bind=True, max_retries=settings.webhook_max_retries)
def webhook(self: Any, finetune_id: str) -> str:
    try:
        return deliver_finetune_webhook(finetune_id, settings=settings, sessions=sessions())
    except WebhookRetry as exc:
        delay = settings.webhook_backoff_s * 2**self.request.retries
        log.warning("webhook of %s: %s; retrying in %.0f s", finetune_id, exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
