"""inflight.py: concurrent lookups of one key share a single call."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from media_proxy.inflight import Inflight


class Lookup:
    """A lookup that counts its calls and waits for `release` before answering."""

    def __init__(self, result: object = "value", error: Exception | None = None) -> None:
        self.calls = 0
        self.finished = 0
        self.release = asyncio.Event()
        self.result, self.error = result, error

    def __call__(self) -> Callable[[], Awaitable[object]]:
        async def run() -> object:
            self.calls += 1
            await self.release.wait()
            self.finished += 1
            if self.error is not None:
                raise self.error
            return self.result

        return run


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_runs_of_one_key_share_one_call() -> None:
    inflight: Inflight[object] = Inflight()
    lookup = Lookup()
    waiters = [asyncio.create_task(inflight.run("k", lookup())) for _ in range(10)]
    await settle()
    assert lookup.calls == 1
    lookup.release.set()
    assert await asyncio.gather(*waiters) == ["value"] * 10
    assert lookup.calls == 1


async def test_different_keys_run_separately() -> None:
    inflight: Inflight[object] = Inflight()
    a, b = Lookup("a"), Lookup("b")
    ta = asyncio.create_task(inflight.run(("tok", ()), a()))
    tb = asyncio.create_task(inflight.run(("tok", (("user_id", "x"),)), b()))
    await settle()
    assert (a.calls, b.calls) == (1, 1)
    a.release.set()
    b.release.set()
    assert list(await asyncio.gather(ta, tb)) == ["a", "b"]


async def test_results_are_not_cached() -> None:
    inflight: Inflight[object] = Inflight()
    lookup = Lookup()
    lookup.release.set()
    assert await inflight.run("k", lookup()) == "value"
    await settle()
    lookup.result = "new"
    assert await inflight.run("k", lookup()) == "new"
    assert lookup.calls == 2


async def test_cancelled_waiter_does_not_cancel_the_shared_call() -> None:
    inflight: Inflight[object] = Inflight()
    lookup = Lookup()
    first = asyncio.create_task(inflight.run("k", lookup()))
    second = asyncio.create_task(inflight.run("k", lookup()))
    await settle()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    lookup.release.set()
    assert await second == "value"
    assert (lookup.calls, lookup.finished) == (1, 1)


async def test_call_finishes_even_if_every_waiter_is_cancelled() -> None:
    inflight: Inflight[object] = Inflight()
    lookup = Lookup()
    only = asyncio.create_task(inflight.run("k", lookup()))
    await settle()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    # a new waiter joins the call still running instead of starting another
    late = asyncio.create_task(inflight.run("k", lookup()))
    await settle()
    lookup.release.set()
    assert await late == "value"
    assert (lookup.calls, lookup.finished) == (1, 1)


async def test_exception_reaches_every_waiter_and_is_not_cached() -> None:
    inflight: Inflight[object] = Inflight()
    lookup = Lookup(error=RuntimeError("synapse down"))
    waiters = [asyncio.create_task(inflight.run("k", lookup())) for _ in range(3)]
    await settle()
    lookup.release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and str(r) == "synapse down" for r in results)
    assert lookup.calls == 1
    await settle()
    lookup.error = None
    assert await inflight.run("k", lookup()) == "value"
    assert lookup.calls == 2


async def test_finished_keys_are_forgotten() -> None:
    inflight: Inflight[object] = Inflight()
    for i in range(3):
        lookup = Lookup(i)
        lookup.release.set()
        assert await inflight.run(i, lookup()) == i
    await settle()
    assert inflight._running == {}
