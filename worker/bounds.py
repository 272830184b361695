"""A job's time limit as the worker enforces it, and the cheap stop check the core polls.

The limit (TUNEQDM_FINETUNE_TIME_LIMIT_S / TUNEQDM_GENERATION_TIME_LIMIT_S) is stored on the
row at submit and counts from the job's first start (`started_at`, kept across resumes), so a
job that keeps getting taken over cannot run forever either. The core asks `should_stop()`
before every UNet block (tuneqdm_core.cancel), so it only reads a monotonic clock and the
lease's flag, which the heartbeat thread sets when the job was canceled or taken over.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from app.models import utcnow


class Deadline:
    def __init__(self, started_at: datetime | None, limit_s: float | None, setting: str) -> None:
        self.limit_s = limit_s
        self.setting = setting
        self.at: float | None = None
        if limit_s is not None:
            used = (utcnow() - started_at).total_seconds() if started_at is not None else 0.0
            self.at = time.monotonic() + limit_s - max(used, 0.0)

    def passed(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def message(self, what: str, fewer: str) -> str:
        return (
            f"the {what} ran past its time limit of {self.limit_s:g} s and was stopped "
            f"({self.setting}); submit it again with {fewer}"
        )


def stop_check(lost: Callable[[], bool], deadline: Deadline) -> Callable[[], bool]:
    """True once the lease is lost (canceled, taken over) or the time limit has passed."""

    def should_stop() -> bool:
        return lost() or deadline.passed()

    return should_stop
