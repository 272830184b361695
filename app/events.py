"""A fine-tune's event log (GET /v1/finetunes/{id}/events): state changes, progress, samples
and webhook attempts, one `finetune_events` row each. Shared by app and worker: no FastAPI.

An event is added in the transaction of what it records (the job's UPDATE, the sample rows,
the delivery's outcome) after that transaction has locked the job's row: events of one job are
then inserted one transaction at a time, so their ids grow in commit order and a reader's
cursor (the last id it saw) never skips an event that commits later.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import FinetuneEvent, FinetuneJob


def record_event(session: Session, job_id: str, type_: str, **data: Any) -> None:
    """Add an event (uncommitted); the caller's transaction holds the job's row lock."""
    session.add(FinetuneEvent(job_id=job_id, type=type_, data=data))


def lock_job(session: Session, job_id: str) -> bool:
    """Lock the job's row for an event that comes with no UPDATE of it; False if it is gone."""
    found = session.scalar(select(FinetuneJob.id).where(FinetuneJob.id == job_id).with_for_update())
    return found is not None
