"""Thin Celery tasks: take an id, hand it to worker.finetunes / generations / exports / webhooks."""

from __future__ import annotations

import logging
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from app.db import engine_from_settings, make_sessionmaker
from app.queue import EXPORT_TASK, FINETUNE_TASK, GENERATE_TASK
from app.storage import LocalStorage
from worker.celery_app import WEBHOOK_QUEUE, WEBHOOK_TASK, app, settings
from worker.exports import run_export
from worker.finetunes import Context, run_finetune
from worker.generations import run_generation
from worker.runtime import get_runtime
from worker.webhooks import deliver_for_job

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def sessions() -> sessionmaker[Session]:
    return make_sessionmaker(engine_from_settings(settings))


def notify(job_id: str, countdown: float = 0) -> None:
    """Ask for an attempt of the job's webhook now (or after `countdown`); delivery never
    blocks a job. A lost message loses nothing: the delivery row waits for the sweep."""
    try:
        webhook.apply_async(args=[job_id], queue=WEBHOOK_QUEUE, countdown=countdown)
    except Exception:
        log.exception("could not queue the webhook of %s", job_id)


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


@app.task(name=WEBHOOK_TASK)
def webhook(job_id: str) -> str:
    attempt = deliver_for_job(job_id, settings=settings, sessions=sessions())
    if attempt is None:
        return "no pending webhook"
    if attempt.retry_in_s is not None:
        log.warning(
            "webhook of %s not delivered; next attempt in %.0f s", job_id, attempt.retry_in_s
        )
        notify(job_id, countdown=attempt.retry_in_s)
    return attempt.outcome
