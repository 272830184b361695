"""Thin Celery tasks: take an id, hand it to worker.finetunes / generations / exports / webhooks."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db import engine_from_settings, make_sessionmaker
from app.queue import EXPORT_TASK, FINETUNE_TASK, GENERATE_TASK
from app.storage import LocalStorage
from worker.celery_app import WEBHOOK_QUEUE, WEBHOOK_TASK, app, settings
from worker.exports import run_export
from worker.finetunes import Context, run_finetune
from worker.generations import run_generation
from worker.runtime import get_runtime
from worker.webhooks import WebhookRetry, deliver_finetune_webhook

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def sessions() -> sessionmaker[Session]:
    return make_sessionmaker(engine_from_settings(settings))


def notify(finetune_id: str) -> None:
    """Queue the webhook; delivery (and its retries) never blocks training."""
    try:
        webhook.apply_async(args=[finetune_id], queue=WEBHOOK_QUEUE)
    except Exception:
        log.exception("could not queue the webhook of %s", finetune_id)


def context() -> Context:
    return Context(
        settings=settings,
        sessions=sessions(),
        storage=LocalStorage(settings.resolved_storage_dir),
        runtime=get_runtime(settings),
        notify=notify,
    )


@app.task(name=FINETUNE_TASK)
def finetune(finetune_id: str) -> str:
    outcome = run_finetune(finetune_id, context())
    log.info("fine-tune %s: %s", finetune_id, outcome)
    return outcome


@app.task(name=GENERATE_TASK)
def generate(generation_id: str) -> str:
    outcome = run_generation(generation_id, context())
    log.info("generation %s: %s", generation_id, outcome)
    return outcome


@app.task(name=EXPORT_TASK)
def export(export_id: str) -> str:
    outcome = run_export(export_id, context())
    log.info("export %s: %s", export_id, outcome)
    return outcome


@app.task(name=WEBHOOK_TASK, bind=True, max_retries=settings.webhook_max_retries)
def webhook(self: Any, finetune_id: str) -> str:
    try:
        return deliver_finetune_webhook(finetune_id, settings=settings, sessions=sessions())
    except WebhookRetry as exc:
        delay = settings.webhook_backoff_s * 2**self.request.retries
        log.warning("webhook of %s: %s; retrying in %.0f s", finetune_id, exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
