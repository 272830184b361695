"""A bounded pool for the CPU work on uploaded photos, shared fairly between tenants.

Decoding and re-encoding a large photo takes a CPU core for a while; an API process runs at
most TUNEQDM_IMAGE_WORKERS of them at once, and one tenant at most
TUNEQDM_IMAGE_WORKERS_PER_TENANT of those, one photo at a time. A request waiting for a slot
waits on the event loop, holding neither a thread of the request pool nor a database
connection, so a tenant uploading fifty albums delays another tenant's upload by about one
photo, not fifty albums.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

T = TypeVar("T")


class ImagePool:
    def __init__(self, *, workers: int, per_tenant: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image")
        self.per_tenant = per_tenant
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    async def run(self, tenant_id: str, fn: Callable[..., T], /, *args: object, **kw: object) -> T:
        """Run `fn(*args, **kw)` in the pool once `tenant_id` has a free slot."""
        slot = self._slots.setdefault(tenant_id, asyncio.Semaphore(self.per_tenant))
        self._users[tenant_id] = self._users.get(tenant_id, 0) + 1
        try:
            async with slot:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self.executor, partial(fn, *args, **kw))
        finally:
            self._users[tenant_id] -= 1
            if not self._users[tenant_id]:  # forget idle tenants
                del self._users[tenant_id]
                del self._slots[tenant_id]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
