"""The response type of Starlette's TestClient: httpx2's when installed, else httpx's."""

try:
    from httpx2 import Response
except ImportError:  # pragma: no cover - starlette falls back to httpx without httpx2
    from httpx import Response  # type: ignore[assignment]

__all__ = ["Response"]
