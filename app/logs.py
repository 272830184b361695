"""Logging shared by the API, the CLI and the worker: JSON lines that carry a request id.

What never goes into a log: photos, prompts, API keys, webhook URLs and SQL parameters (the
engine is built with hide_parameters=True, app/db.py). Log ids and counts instead.

`audit(event, **fields)` writes one line on the `tuneqdm.audit` logger for each change an
operator may have to account for: key creation and revocation, deletions, purges, limits.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import uuid
from datetime import datetime, timezone
from typing import Any

# The id of the request being served (set by app.middleware.RequestContext), or "-".
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# A client's X-Request-ID is echoed only when it is short and plain; anything else is replaced,
# so a header cannot inject text into log lines.
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

audit_log = logging.getLogger("tuneqdm.audit")
_HANDLER_NAME = "tuneqdm"
# LogRecord attributes that are not extra fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def new_request_id(offered: str | None = None) -> str:
    if offered is not None and _SANE_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "request_id": request_id.get(),
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.request_id = request_id.get()
        return super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the line (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def configure_logging(*, json_lines: bool = True, level: str = "INFO") -> None:
    """Install one stderr handler on the root logger (again: replaces it, never adds a second).

    uvicorn's and celery's loggers propagate to it, so every line has the same shape.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        # uvicorn installs its own handlers; its lines go through ours instead.
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Our access line (app.middleware) has the request id and the status; uvicorn's repeats it.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # The engine's own echo would print statements; parameters are hidden anyway (app/db.py).
    logging.getLogger("sqlalchemy.engine").setLevel(logging.WARNING)


def audit(event: str, **fields: Any) -> None:
    """One audit line: `event` (e.g. "key.create") and ids; never secrets or people's data."""
    audit_log.info(event, extra={"audit": event, **fields})
