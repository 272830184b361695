"""Thin Celery tasks: one per job kind (worker/kinds.py), each taking an id and handing it to
its kind's `run`, plus the webhook task.

A task that cannot reach the database does not acknowledge its message away: it is retried
with a doubling delay (TUNEQDM_DB_RETRY_S, at most a minute apart) for as long as it takes.
Every kind gets this the same way.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError

from app.storage import Storage, storage_from_settings
from worker.celery_app import (
    WEBHOOK_QUEUE,
    WEBHOOK_TASK,
    app,
    job_route,
    restart_stalled,
    sessions,
    settings,
)
from worker.context import Context
from worker.kinds import KINDS, JobKind
from worker.runtime import get_runtime
from worker.webhooks import deliver_for_job

log = logging.getLogger(__name__)

DB_UNREACHABLE = (OperationalError, InterfaceError, DisconnectionError)
MAX_DB_RETRY_S = 60.0


def notify(job_id: str, countdown: float = 0) -> None:
    """Ask for an attempt of the job's webhook now (or after `countdown`); delivery never
    blocks a job. A lost message loses nothing: the delivery row waits for the sweep."""
    try:
        webhook.apply_async(args=[job_id], queue=WEBHOOK_QUEUE, countdown=countdown)
    except Exception:
        log.exception("could not queue the webhook of %s", job_id)


def requeue(model: Any, job_id: str) -> None:
    task, queue = job_route(model)
    app.send_task(task, args=[job_id], queue=queue)


_storage: Storage | None = None


def context() -> Context[Storage]:
    global _storage
    if _storage is None:  # one client per process (an S3 client holds a connection pool)
        _storage = storage_from_settings(settings)
    return Context(
        settings=settings,
        sessions=sessions(),
        storage=_storage,
        runtime=get_runtime(settings),
        notify=notify,
        requeue=requeue,
        on_stall=restart_stalled,
    )


def _retry_later(task: Any, exc: Exception, object_id: str) -> Exception:
    delay = min(MAX_DB_RETRY_S, settings.db_retry_s * 2**task.request.retries)
    log.warning("%s: database not reachable (%s); retrying in %.0f s", object_id, exc, delay)
    return task.retry(exc=exc, countdown=delay)


def _task_of(kind: JobKind) -> Any:
    def run(self: Any, job_id: str) -> str:
        try:
            outcome = kind.run(job_id, context())
        except DB_UNREACHABLE as exc:
            raise _retry_later(self, exc, job_id) from exc
        log.info("%s %s: %s", kind.name, job_id, outcome)
        return outcome

    run.__name__ = run.__qualname__ = kind.name.replace("-", "")
    return app.task(name=kind.task, bind=True, max_retries=None)(run)


TASKS = {kind.task: _task_of(kind) for kind in KINDS}


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
