"""Fair shares inside one API process: one tenant's burst of photos never takes every image
thread (ImagePool), one key's burst of requests never takes every request thread
(KeyConcurrency)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from app.image_pool import ImagePool
from app.middleware import KeyConcurrency


def test_a_busy_tenant_leaves_a_thread_for_another() -> None:
    pool = ImagePool(workers=2, per_tenant=1)
    release = threading.Event()
    running: list[str] = []
    lock = threading.Lock()

    def work(name: str) -> str:
        with lock:
            running.append(name)
        if name.startswith("flood"):
            release.wait(timeout=30)
        return name

    async def scenario() -> list[str]:
        flood = [asyncio.create_task(pool.run("flood", work, f"flood-{i}")) for i in range(5)]
        # The quiet tenant's photo runs while every flood photo but one is still waiting.
        quiet = await asyncio.wait_for(pool.run("quiet", work, "quiet-0"), timeout=30)
        with lock:
            seen = list(running)
        release.set()
        await asyncio.gather(*flood)
        return [quiet, *seen]

    try:
        result = asyncio.run(scenario())
    finally:
        release.set()
        pool.shutdown()
    assert result[0] == "quiet-0"
    assert sorted(result[1:]) == ["flood-0", "quiet-0"]  # one flood photo at a time
    assert pool._slots == {}  # idle tenants are forgotten


def test_one_keys_burst_of_requests_waits_outside_the_app() -> None:
    release = asyncio.Event()
    inside: list[bytes] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        key = dict(scope["headers"])[b"authorization"]
        inside.append(key)
        if key == b"Bearer flood":
            await release.wait()

    capped = KeyConcurrency(app, per_key=2)

    def request(key: bytes) -> Any:
        async def receive() -> Any:
            return {"type": "http.request"}

        async def send(_message: Any) -> None:
            pass

        return capped({"type": "http", "headers": [(b"authorization", key)]}, receive, send)

    async def scenario() -> list[bytes]:
        flood = [asyncio.create_task(request(b"Bearer flood")) for _ in range(5)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(request(b"Bearer quiet"), timeout=30)
        seen = list(inside)
        release.set()
        await asyncio.gather(*flood)
        return seen

    seen = asyncio.run(scenario())
    # Two of the flood's five requests were inside when the quiet one ran; three waited.
    assert seen == [b"Bearer flood", b"Bearer flood", b"Bearer quiet"]
    assert capped._slots == {}
