"""Opaque public ids: a type prefix plus 128 random bits, so ids reveal neither order nor count."""

import re
import uuid

_ID_RE = re.compile(r"^[a-z]{2,3}_[0-9a-f]{32}$")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def looks_like_id(value: str, prefix: str) -> bool:
    """Cheap shape check before a lookup, so junk (e.g. NUL bytes, which PostgreSQL refuses in
    text) never reaches the database and answers like any unknown id."""
    return value.startswith(prefix + "_") and _ID_RE.fullmatch(value) is not None
