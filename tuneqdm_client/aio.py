"""`AsyncClient`: the same methods as `Client`, to await from asyncio code.

Each call runs the `Client` method in a thread (asyncio.to_thread) over one shared httpx
connection pool, so an event loop is never blocked by an upload, a download or the polling of
`wait_finetune`/`generate`, and many calls can be in flight at once. One implementation of
each operation: the signatures, results and errors (`ApiError`, `JobFailed`) are `Client`'s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import httpx

from tuneqdm_client.client import Client

P = ParamSpec("P")
R = TypeVar("R")


def _threaded(
    method: Callable[Concatenate[Client, P], R],
) -> Callable[Concatenate[AsyncClient, P], Awaitable[R]]:
    async def call(self: AsyncClient, *args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(method, self.sync, *args, **kwargs)

    call.__name__ = method.__name__
    call.__qualname__ = f"AsyncClient.{method.__name__}"
    call.__doc__ = method.__doc__
    return call


class AsyncClient:
    """async with AsyncClient(url, key) as client: job = await client.get_finetune(id)"""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.sync = Client(base_url, api_key, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    create_finetune = _threaded(Client.create_finetune)
    get_finetune = _threaded(Client.get_finetune)
    list_finetunes = _threaded(Client.list_finetunes)
    cancel_finetune = _threaded(Client.cancel_finetune)
    delete_finetune = _threaded(Client.delete_finetune)
    wait_finetune = _threaded(Client.wait_finetune)
    samples = _threaded(Client.samples)
    download_samples = _threaded(Client.download_samples)
    checkpoints = _threaded(Client.checkpoints)
    promote_checkpoint = _threaded(Client.promote_checkpoint)
    events = _threaded(Client.events)
    bases = _threaded(Client.bases)
    list_adapters = _threaded(Client.list_adapters)
    get_adapter = _threaded(Client.get_adapter)
    delete_adapter = _threaded(Client.delete_adapter)
    upload_adapter = _threaded(Client.upload_adapter)
    download_adapter = _threaded(Client.download_adapter)
    create_export = _threaded(Client.create_export)
    list_exports = _threaded(Client.list_exports)
    download_export = _threaded(Client.download_export)
    generate = _threaded(Client.generate)
    get_generation = _threaded(Client.get_generation)
    list_generations = _threaded(Client.list_generations)
    delete_generation = _threaded(Client.delete_generation)
    wait_generation = _threaded(Client.wait_generation)
    download_images = _threaded(Client.download_images)
