"""Opaque public ids: a type prefix plus 128 random bits, so ids reveal neither order nor count."""

import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
