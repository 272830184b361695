"""The image pool: one tenant's burst of photos never takes every worker thread."""

from __future__ import annotations

import asyncio
import threading

from app.image_pool import ImagePool


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
