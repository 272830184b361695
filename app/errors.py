"""Domain exceptions raised by services; app/main.py maps each to one HTTP status.

Messages are shown to API users as-is, so they say what was wrong and how to fix it.
"""


class DomainError(Exception):
    """`detail` says what to fix; `field`, when one field is at fault, names it (e.g. `width`)
    and becomes the problem's `errors` entry."""

    def __init__(self, detail: str, *, field: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field


class NotFound(DomainError):
    """The object does not exist or belongs to another tenant (indistinguishable on purpose)."""


class InvalidInput(DomainError):
    """The request is well-formed but its content is not acceptable."""


class PayloadTooLarge(DomainError):
    """A file or the request body is above a byte limit."""


class Conflict(DomainError):
    """The request does not fit the current state of the object."""


class Unauthorized(DomainError):
    """Missing, unknown or revoked API key."""


class ServiceUnavailable(DomainError):
    """A dependency (database, broker) is not reachable; the request can be retried."""


class TooManyRequests(DomainError):
    """A per-tenant limit is reached; `retry_after_s` says when trying again can succeed."""

    def __init__(self, detail: str, *, retry_after_s: int) -> None:
        super().__init__(detail)
        self.retry_after_s = max(1, retry_after_s)
