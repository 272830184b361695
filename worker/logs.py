"""The worker's logs in the API's format (app.logs): JSON lines, with the Celery task id in the
`request_id` field while a task runs, so one job's lines can be followed.

Imported by worker/celery_app.py for its signal handlers.
"""

from __future__ import annotations

from contextvars import Token
from typing import Any

from celery.signals import setup_logging, task_postrun, task_prerun

from app.logs import configure_logging, request_id
from app.settings import get_settings

_tokens: dict[str, Token[str]] = {}


@setup_logging.connect
def _configure(**_: Any) -> None:
    # Connected, so Celery leaves the root logger to us instead of installing its own format.
    settings = get_settings()
    configure_logging(json_lines=settings.log_json, level=settings.log_level)


@task_prerun.connect
def _task_started(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        _tokens[task_id] = request_id.set(f"task-{task_id}")


@task_postrun.connect
def _task_ended(task_id: str | None = None, **_: Any) -> None:
    token = _tokens.pop(task_id or "", None)
    if token is not None:
        request_id.reset(token)
