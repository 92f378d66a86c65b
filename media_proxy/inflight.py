"""Coalescing of concurrent lookups of the same key inside one process.

A cold cache under load would otherwise send a burst of identical queries (the same
whoami, the same media row) to Synapse or the database at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Inflight(Generic[T]):
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[T]] = {}

    async def run(self, key: Hashable, make: Callable[[], Awaitable[T]]) -> T:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(make())
            self._running[key] = future
            future.add_done_callback(lambda _: self._running.pop(key, None))
        # shield: one waiter hanging up must not cancel the lookup the others wait on
        return await asyncio.shield(future)
