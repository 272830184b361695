"""Checks shared by the services."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.errors import InvalidInput

T = TypeVar("T")


def optional_text(value: str | None, *, field: str, max_chars: int) -> str | None:
    """Strip and bound a free-text field; empty counts as missing."""
    text = (value or "").strip()
    # PostgreSQL refuses NUL in text columns; refuse it here with a message instead of a 500.
    if "\x00" in text:
        raise InvalidInput(f"{field} contains a NUL character; send plain text")
    if len(text) > max_chars:
        raise InvalidInput(
            f"{field} has {len(text)} characters, above the limit of {max_chars}; shorten it"
        )
    return text or None


def required_text(value: str | None, *, field: str, max_chars: int) -> str:
    text = optional_text(value, field=field, max_chars=max_chars)
    if text is None:
        raise InvalidInput(f"{field} is empty; describe the image in a few words")
    return text


def page(session: Session, stmt: Select[T], *, limit: int, offset: int) -> tuple[list[T], int]:
    """One page of `stmt` plus the total count of rows it matches."""
    count = session.scalar(select(func.count()).select_from(stmt.order_by(None).subquery()))
    rows = list(session.scalars(stmt.limit(limit).offset(offset)))
    return rows, int(count or 0)
