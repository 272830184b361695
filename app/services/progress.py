"""What a fine-tune shows while it trains: its progress images and its event log.

Both are read through the tenant's own job (`get_finetune`), so another tenant's id is a 404.
The event cursor is opaque to clients; inside it is the id of the last event a page returned
(ids grow in commit order per job, app/events.py), so pages neither repeat nor skip events.
"""

from __future__ import annotations

import base64
import binascii

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidInput, NotFound
from app.models import FinetuneEvent, FinetuneSample, Tenant
from app.services.finetunes import get_finetune

_CURSOR_PREFIX = "ev1:"


def encode_cursor(after_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{after_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The event id a cursor continues after (0: from the first event)."""
    if cursor is None or cursor == "":
        return 0
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if not text.startswith(_CURSOR_PREFIX):
            raise ValueError(text)
        after = int(text.removeprefix(_CURSOR_PREFIX))
        if not 0 <= after < 2**62:
            raise ValueError(text)
        return after
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(
            "cursor is not valid; pass the next_cursor of a previous page, or leave it out to "
            "start at the first event"
        ) from None


def list_samples(*, session: Session, tenant: Tenant, finetune_id: str) -> list[FinetuneSample]:
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    return list(
        session.scalars(
            select(FinetuneSample)
            .where(FinetuneSample.job_id == job.id)
            .order_by(FinetuneSample.step, FinetuneSample.prompt_index)
        )
    )


def get_sample(
    *, session: Session, tenant: Tenant, finetune_id: str, step: int, prompt_index: int
) -> FinetuneSample:
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    row = session.scalar(
        select(FinetuneSample).where(
            FinetuneSample.job_id == job.id,
            FinetuneSample.step == step,
            FinetuneSample.prompt_index == prompt_index,
        )
    )
    if row is None:
        raise NotFound(
            f"fine-tune {job.id} has no progress image for step {step}, prompt {prompt_index}; "
            f"GET /v1/finetunes/{job.id}/samples lists those it has"
        )
    return row


def list_events(
    *, session: Session, tenant: Tenant, finetune_id: str, cursor: str | None, limit: int
) -> tuple[list[FinetuneEvent], str, bool]:
    """(events after the cursor, oldest first; the next cursor; whether more follow now)."""
    after = decode_cursor(cursor)
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    rows = list(
        session.scalars(
            select(FinetuneEvent)
            .where(FinetuneEvent.job_id == job.id, FinetuneEvent.id > after)
            .order_by(FinetuneEvent.id)
            .limit(limit + 1)
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1].id if rows else after
    return rows, encode_cursor(last), more
