"""Every error the API answers, as an RFC 9457 problem (`application/problem+json`).

One shape for the service's own errors (app.errors), FastAPI's request validation, Starlette's
404/405 and the middleware's 413: `type`, `title`, `status`, `detail`, and for invalid input
`errors`, one `{field, message}` per problem found. A validation problem names the field and the
rule it breaks and never quotes the value sent: that value can be a photo's bytes, an API key
or a webhook secret.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, Field
from starlette.responses import Response

MEDIA_TYPE = "application/problem+json"
# `type` of each kind of problem; a URN, as these are names to compare, not pages to fetch.
_TYPE_PREFIX = "urn:tuneqdm:problem:"
TYPES: dict[int, str] = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "payload-too-large",
    415: "unsupported-media-type",
    422: "invalid-input",
    429: "too-many-requests",
    500: "internal",
    503: "unavailable",
}
# Where a request value came from, FastAPI's first `loc` element; left out of `field`.
_SOURCES = {"body", "query", "path", "header", "cookie"}


class FieldError(BaseModel):
    field: str = Field(description="The field at fault, e.g. `width` or `params.steps`.")
    message: str = Field(description="The rule it breaks and how to fix it.")


class Problem(BaseModel):
    """An RFC 9457 problem: what went wrong and what to do about it."""

    type: str = Field(
        description="Identifies the kind of problem, e.g. urn:tuneqdm:problem:conflict."
    )
    title: str = Field(description="The HTTP status phrase, e.g. 'Conflict'.")
    status: int = Field(description="The HTTP status code, repeated.")
    detail: str = Field(description="What was wrong in this request and how to fix it.")
    # Not nullable: present only on invalid input, so generated types stay a plain list.
    errors: list[FieldError] = Field(
        default_factory=list, description="For invalid input: one entry per field at fault."
    )


def type_of(status: int) -> str:
    return _TYPE_PREFIX + TYPES.get(status, "client-error" if status < 500 else "server-error")


def title_of(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def field_name(loc: Sequence[Any]) -> str:
    """`("body", "params", "steps")` → `params.steps`; `("body", "images", 0)` → `images[0]`."""
    parts = list(loc)
    source = str(parts.pop(0)) if parts and str(parts[0]) in _SOURCES else "body"
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return name or source


def validation_errors(raw: Sequence[Mapping[str, Any]]) -> list[FieldError]:
    """FastAPI's error dicts as `{field, message}`; their `input` and `ctx` are dropped."""
    return [
        FieldError(field=field_name(e.get("loc", ())), message=str(e.get("msg", ""))) for e in raw
    ]


def summary(errors: Sequence[FieldError]) -> str:
    return "; ".join(f"{e.field}: {e.message}" for e in errors)


def _finite(value: Any) -> Any:
    # An extension member can carry a float; NaN/inf would make the JSON invalid.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def body(
    status: int,
    detail: str,
    *,
    errors: Sequence[FieldError] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> bytes:
    doc: dict[str, Any] = {
        "type": type_of(status),
        "title": title_of(status),
        "status": status,
        "detail": detail,
    }
    if errors is not None:
        doc["errors"] = [e.model_dump() for e in errors]
    if extra:
        doc.update(_finite(dict(extra)))
    return json.dumps(doc, ensure_ascii=False, allow_nan=False).encode()


def response(
    status: int,
    detail: str,
    *,
    errors: Sequence[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    return Response(
        body(status, detail, errors=errors, extra=extra),
        status_code=status,
        media_type=MEDIA_TYPE,
        headers=dict(headers) if headers else None,
    )
