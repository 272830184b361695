"""Idempotency-Key: a repeated request returns its first job; the same key with another
request answers 409.

A key is bound to a fingerprint of the request it was first used with (the fields as sent and
the SHA-256 of every photo), stored on the job row; the (tenant, key) unique constraint makes
two concurrent requests with one key create one job. A key is free again once its job is older
than TUNEQDM_IDEMPOTENCY_TTL_S.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy import Select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, InvalidInput
from app.models import FinetuneJob, GenerationJob, utcnow

Job = TypeVar("Job", FinetuneJob, GenerationJob)

MAX_KEY_CHARS = 255  # the column's width


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_KEY_CHARS or not key.isprintable() or not key.isascii():
        raise InvalidInput(
            f"Idempotency-Key must be 1-{MAX_KEY_CHARS} printable ASCII characters, e.g. a UUID"
        )
    return key


def fingerprint(fields: dict[str, Any], files: Sequence[bytes] = ()) -> str:
    """SHA-256 over the request's fields (canonical JSON) and the digests of its files."""
    return fingerprint_digests(fields, [hashlib.sha256(data).hexdigest() for data in files])


def fingerprint_digests(fields: dict[str, Any], digests: Sequence[str]) -> str:
    """`fingerprint` from the files' SHA-256 hex digests (the photos are hashed when read)."""
    canonical = json.dumps(
        {"fields": fields, "files": list(digests)}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def canonical_json(raw: str | None) -> Any:
    """A JSON form field as its parsed value, so spacing and key order do not count; text that
    is not JSON stays as it is (validation refuses it later)."""
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def replay(
    session: Session,
    query: Select[Job],
    *,
    key: str,
    fingerprint: str,
    ttl_s: float,
    expire: bool = True,
) -> Job | None:
    """The job an unexpired `key` already created (`query` selects the tenant's job with that
    key), None if there is none; 409 when it was created by another request."""
    job = session.scalar(query)
    if job is None:
        return None
    model = type(job)
    if expire and job.created_at < utcnow() - timedelta(seconds=ttl_s):
        # Expired: free the key (conditional, so two requests freeing it at once is harmless).
        session.execute(
            update(model)
            .where(model.id == job.id, model.idempotency_key == key)
            .values(idempotency_key=None)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return None
    # Rows from before fingerprints were stored replay as they always did.
    if job.idempotency_fingerprint not in (None, fingerprint):
        raise Conflict(
            f"Idempotency-Key {key!r} was already used for a different request (job {job.id}); "
            "repeat that request unchanged to get its job again, or send a new key for a new "
            f"request (keys are kept for {ttl_s / 3600:g} h)"
        )
    return job
