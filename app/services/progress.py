"""What a fine-tune shows while it trains: its progress images, its kept checkpoints and its
event log.

All are read through the tenant's own job (`get_finetune`), so another tenant's id is a 404.

The event cursor is opaque to clients and bound to its (tenant, job): inside it is how many of
the job's events the client has seen, with an HMAC of the tenant, the job and that count under
TUNEQDM_SECRET_KEY. A cursor of another job or another tenant is refused (422), and none reveals
anything outside its job (the events' ids are global, so they are never put in one). Events of a
job are appended in commit order (app/events.py) and only deleted with the job, so the n-th event
of a job stays the n-th: pages neither repeat nor skip one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import InvalidInput, NotFound
from app.models import FinetuneCheckpoint, FinetuneEvent, FinetuneSample, Tenant
from app.services.finetunes import get_finetune

# The signature's length in bytes: 128 bits make a forgery as likely as guessing a key.
_MAC_BYTES = 16
_COUNT = struct.Struct(">Q")


def _mac(secret_key: str, tenant_id: str, job_id: str, seen: int) -> bytes:
    message = f"events:v2:{tenant_id}:{job_id}:{seen}".encode()
    return hmac.new(secret_key.encode(), message, hashlib.sha256).digest()[:_MAC_BYTES]


def encode_cursor(secret_key: str, tenant_id: str, job_id: str, seen: int) -> str:
    """The cursor after the first `seen` events of the job."""
    raw = _COUNT.pack(seen) + _mac(secret_key, tenant_id, job_id, seen)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None, secret_key: str, tenant_id: str, job_id: str) -> int:
    """How many events of the job the cursor has seen (0: none, start at the first)."""
    if cursor is None or cursor == "":
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if len(raw) != _COUNT.size + _MAC_BYTES:
            raise ValueError(len(raw))
        (seen,) = _COUNT.unpack(raw[: _COUNT.size])
        if not hmac.compare_digest(raw[_COUNT.size :], _mac(secret_key, tenant_id, job_id, seen)):
            raise ValueError("signature")
        return int(seen)
    except (ValueError, binascii.Error):
        raise InvalidInput(
            "cursor is not valid for this fine-tune; pass the next_cursor of a previous page "
            "of this fine-tune's events, or leave it out to start at the first event"
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


def list_checkpoints(
    *, session: Session, tenant: Tenant, finetune_id: str
) -> list[tuple[FinetuneCheckpoint, list[FinetuneSample]]]:
    """The job's kept checkpoints by step, each with the progress images of its step."""
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    rows = session.scalars(
        select(FinetuneCheckpoint)
        .where(FinetuneCheckpoint.job_id == job.id)
        .order_by(FinetuneCheckpoint.step)
    )
    samples: dict[int, list[FinetuneSample]] = {}
    for sample in list_samples(session=session, tenant=tenant, finetune_id=job.id):
        samples.setdefault(sample.step, []).append(sample)
    return [(row, samples.get(row.step, [])) for row in rows]


def list_events(
    *,
    session: Session,
    tenant: Tenant,
    finetune_id: str,
    cursor: str | None,
    limit: int,
    secret_key: str,
) -> tuple[list[FinetuneEvent], str, bool]:
    """(events after the cursor, oldest first; the next cursor; whether more follow now)."""
    job = get_finetune(session=session, tenant=tenant, finetune_id=finetune_id)
    seen = decode_cursor(cursor, secret_key, tenant.id, job.id)
    rows = list(
        session.scalars(
            select(FinetuneEvent)
            .where(FinetuneEvent.job_id == job.id)
            .order_by(FinetuneEvent.id)
            .offset(seen)
            .limit(limit + 1)
        )
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, encode_cursor(secret_key, tenant.id, job.id, seen + len(rows)), more
