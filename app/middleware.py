"""ASGI middleware: a request id, `X-Content-Type-Options: nosniff` and one access log line per
request (RequestContext), and a fair share of the request threads per API key (KeyConcurrency).

The id comes from the client's X-Request-ID when it is sane (app.logs.new_request_id), else it
is generated; it is returned in the X-Request-ID response header and is in every log line
written while the request is served, so a user's report can be matched to the logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.logs import new_request_id, request_id

log = logging.getLogger("tuneqdm.access")
HEADER = b"x-request-id"
NOSNIFF = b"x-content-type-options"
_OWN = (HEADER, NOSNIFF)


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope.get("headers") or []).get(HEADER)
        rid = new_request_id(offered.decode("latin-1") if offered is not None else None)
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500  # until the response starts

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _OWN]
                # nosniff: a browser takes each response as its Content-Type says (an uploaded
                # or generated file is never run as a script or a page).
                own = [(HEADER, rid.encode()), (NOSNIFF, b"nosniff")]
                message = {**message, "headers": [*headers, *own]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # Left set: Starlette's outermost error handler (app.main._unexpected) still runs
            # in this request's context and puts the id in its log line and its 500 response.
            self._access(scope, 500, started)
            raise
        self._access(scope, status, started)
        request_id.reset(token)

    @staticmethod
    def _access(scope: Scope, status: int, started: float) -> None:
        # The path holds only ids (never a prompt); the query string is left out.
        log.info(
            "%s %s %d",
            scope["method"],
            scope["path"],
            status,
            extra={
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )


class KeyConcurrency:
    """At most `per_key` requests of one API key run at once in this process; the others wait
    here, on the event loop, before their body is read or a thread is taken.

    The request thread pool (and the database pool behind it) is shared by every tenant; without
    this, fifty concurrent requests of one client take every thread and the next tenant's
    request waits for one. Keyed by a hash of the Authorization header (the tenant is not known
    before authentication, which needs a thread); a request without one is not held.
    """

    def __init__(self, app: ASGIApp, *, per_key: int) -> None:
        self.app = app
        self.per_key = per_key
        self._slots: dict[bytes, asyncio.Semaphore] = {}
        self._users: dict[bytes, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        auth = (
            dict(scope.get("headers") or []).get(b"authorization")
            if scope["type"] == "http"
            else None
        )
        if not auth or not self.per_key:
            await self.app(scope, receive, send)
            return
        key = hashlib.sha256(auth).digest()
        slot = self._slots.setdefault(key, asyncio.Semaphore(self.per_key))
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with slot:
                await self.app(scope, receive, send)
        finally:
            self._users[key] -= 1
            if not self._users[key]:  # forget idle keys
                del self._users[key]
                del self._slots[key]
