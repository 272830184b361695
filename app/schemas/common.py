"""Shared by several resources: the scheduler names, the seed range, webhook state, health.

The literal types of stored values (Status, Method, ...) are app.models'."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app import models

# Every scheduler name of any family; which ones a base runs depends on its family
# (app/families.py, GET /v1/bases).
Scheduler = Literal["ddim", "dpmsolver++", "euler", "heun"]
SEED_MAX = 2**32 - 1


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
