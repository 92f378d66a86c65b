"""Fill slots past the caps go to waiting misses in arrival order: a slot is handed over as
it frees, so a newcomer never takes it from a miss that has waited longer (before, every
waiter re-raced every newcomer, and under sustained load some waited out `fill_wait`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest

from media_proxy.fill import Busy, Filler
from media_proxy.s3 import S3


def filler(tmp_path: Path, *, per_client: int = 1, total: int = 64, wait: float = 5.0) -> Filler:
    return Filler(
        tmp_path,
        cast(S3, None),  # never reached: these tests drive the slots only
        chunk_size=1,
        max_fills=total,
        max_fills_per_client=per_client,
        fill_wait=wait,
    )


async def settle() -> None:
    """Let woken tasks run (a wait for a slot takes a few loop turns to return)."""
    for _ in range(20):
        await asyncio.sleep(0)


def lead(f: Filler, rel: str, client: str | None) -> None:
    """What `open` does once it leads: the slot is counted in _leading."""
    f._leading[rel] = client


async def waiter(f: Filler, client: str | None, order: list[str], name: str) -> None:
    await f._wait_for_slot(client)
    f._reserved[client] -= 1  # now leading, as `open` does
    lead(f, name, client)
    order.append(name)


async def test_waiters_get_slots_in_arrival_order(tmp_path: Path) -> None:
    f = filler(tmp_path)
    lead(f, "first", "a")
    order: list[str] = []
    tasks = [asyncio.create_task(waiter(f, "a", order, f"w{i}")) for i in range(3)]
    await settle()
    assert f._over_caps("a")
    for expected in ("w0", "w1", "w2"):
        previous = "first" if expected == "w0" else order[-1]
        f._free_slot(previous)
        # a newcomer arriving right after the slot freed finds it taken (handed over)
        assert f._over_caps("a")
        await settle()
        assert order[-1] == expected
    await asyncio.gather(*tasks)


async def test_other_clients_pass_a_client_at_its_cap(tmp_path: Path) -> None:
    f = filler(tmp_path, per_client=1, total=3)
    lead(f, "a1", "a")
    order: list[str] = []
    a_waits = asyncio.create_task(waiter(f, "a", order, "a2"))
    await settle()
    assert not f._over_caps("b")  # b is under both caps: it does not queue behind a
    lead(f, "b1", "b")
    lead(f, "c1", "c")  # the worker's cap is reached
    assert f._over_caps("b")
    f._free_slot("b1")  # a is still at its own cap: the slot stays free for others
    await settle()
    assert order == [] and not f._over_caps("b")
    f._free_slot("a1")
    await settle()
    assert order == ["a2"]
    await a_waits


async def test_a_waiter_past_fill_wait_is_busy_and_leaves_the_line(tmp_path: Path) -> None:
    f = filler(tmp_path, wait=0.05)
    lead(f, "first", "a")
    with pytest.raises(Busy) as raised:
        await f._wait_for_slot("a")
    assert raised.value.per_client
    assert not f._queue
    f._free_slot("first")
    assert f._taken() == 0  # nothing was reserved for the one that gave up


async def test_a_cancelled_waiter_leaves_the_line(tmp_path: Path) -> None:
    f = filler(tmp_path)
    lead(f, "first", "a")
    order: list[str] = []
    gone = asyncio.create_task(f._wait_for_slot("a"))
    stays = asyncio.create_task(waiter(f, "a", order, "second"))
    await settle()
    gone.cancel()  # its client hung up while it waited
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert len(f._queue) == 1
    f._free_slot("first")
    await settle()
    assert order == ["second"]
    await stays
    assert f._taken() == 1  # `second` leads; nothing leaked


async def test_a_slot_given_up_without_leading_goes_to_the_next(tmp_path: Path) -> None:
    f = filler(tmp_path)
    lead(f, "first", "a")
    order: list[str] = []
    first_waiter = asyncio.create_task(f._wait_for_slot("a"))
    second = asyncio.create_task(waiter(f, "a", order, "second"))
    await settle()
    f._free_slot("first")
    await first_waiter  # holds the slot; then finds its file complete (a hit): gives it up
    assert order == []
    f._unreserve("a")
    await settle()
    assert order == ["second"]
    await second
