"""Shared by several resources: the scheduler names, the seed range, webhook state, health.

The literal types of stored values (Status, Method, ...) are app.models'."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, cast, get_args

from pydantic import BaseModel, Field

from app import models

# Every scheduler name of any family; which ones a base runs depends on its family
# (app/families.py, GET /v1/bases).
Scheduler = Literal["ddim", "dpmsolver++", "euler", "heun"]
SEED_MAX = 2**32 - 1

PHASE_DOC = (
    "What the job is doing: 'waiting for a worker' while queued, then what its worker writes "
    "as it goes; null once the job is final (and for a moment after a worker claims it)."
)
WAITING_DOC = (
    "While queued: why, from the bases registry (GET /v1/bases) and the base's running jobs: "
    "no worker of the job's base is up, its workers are busy with other jobs, or one is free "
    "and takes it at its next claim; null otherwise."
)


def phase_of(
    status: str, phase: str | None, base: str, waiting: dict[str, str] | None
) -> tuple[models.Phase | None, str | None]:
    """(phase, waiting_reason) of a job: the worker's phase only while it runs (a canceled job's
    row may still hold its last one)."""
    if status == "queued":
        return "waiting for a worker", (waiting or {}).get(base)
    if status == "running" and phase in get_args(models.Phase):
        return cast("models.Phase", phase), None
    return None, None


class WebhookPublic(BaseModel):
    """Delivery state of the job's webhook (null until the job has finished)."""

    id: str = Field(description="The `webhook-id` header of every attempt.")
    event: str
    status: models.DeliveryStatus
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None = Field(description="While pending: the next attempt.")
    delivered_at: datetime | None

    @classmethod
    def from_row(cls, row: models.WebhookDelivery | None) -> WebhookPublic | None:
        if row is None:
            return None
        return cls(
            id=row.id,
            event=row.event,
            status=row.status,  # type: ignore[arg-type]
            attempts=row.attempts,
            last_error=row.last_error,
            next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
            delivered_at=row.delivered_at,
        )


class HealthPublic(BaseModel):
    status: Literal["ok"]
    checks: dict[str, str] = {}
