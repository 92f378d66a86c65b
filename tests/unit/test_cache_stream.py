"""The streamed parts of the cache's upkeep: the walk in S3's key order (and resumed), and the
bounded selection of the oldest files."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

from media_proxy.evict import WALK_SHARE, Recency, Sweep, pause_after, select_oldest
from media_proxy.inventory import (
    RANGE_KEYS,
    CachedFile,
    Kind,
    iter_walk,
    plan_ranges,
    range_bounds,
    segment,
)


def _touch(root: Path, rel: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


RELS = [
    "local_content/ab/cd/efgh",
    "local_content/ab/cd/efgi",
    "local_content/ab/ce/aaaa",
    "local_content/Zb/cd/efgh",  # upper case sorts first
    "local_thumbnails/ab/cd/efgh/32-32-image-png-crop",
    "local_thumbnails/ab/cd/efgh/320-240-image-jpeg-scale",
    # An origin that is another's prefix with a character below "/": a walk sorting names
    # alone would list "a" before "a.b", S3 lists "a.b/..." first.
    "remote_content/a/ab/cd/efgh",
    "remote_content/a.b/ab/cd/efgh",
    "remote_content/a-b:8448/ab/cd/efgh",
    "remote_thumbnail/a/ab/cd/efgh/32-32-image-png",
    "url_cache/2026-11-20/AbCd",
    "url_cache_thumbnails/2026-11-20/AbCd/32-32-image-png-crop",
]


def test_walk_comes_in_s3_key_order(tmp_path: Path) -> None:
    for rel in RELS:
        _touch(tmp_path, rel)
    _touch(tmp_path, ".media-proxy/fill/x")
    assert [f.rel for f in iter_walk(str(tmp_path))] == sorted(RELS)


def test_walk_resumes_after_any_path(tmp_path: Path) -> None:
    for rel in RELS:
        _touch(tmp_path, rel)
    ordered = sorted(RELS)
    for i, rel in enumerate(ordered):
        assert [f.rel for f in iter_walk(str(tmp_path), after=rel)] == ordered[i + 1 :]
    # A folder's path, or one that is not there, resumes at the next file after it.
    assert [f.rel for f in iter_walk(str(tmp_path), after="remote_content/a")] == [
        r for r in ordered if r > "remote_content/a"
    ]
    assert [f.rel for f in iter_walk(str(tmp_path), after="m")] == [r for r in ordered if r > "m"]


def test_segments() -> None:
    assert segment("local_content/ab/cd/efgh") == "local_content/"
    assert segment("remote_content/a.b/ab/cd/efgh") == "remote_content/a.b/"
    assert segment("remote_thumbnail/a/ab/cd/efgh/32-32-image-png") == "remote_thumbnail/a/"


def _file(i: int, size: int = 100) -> CachedFile:
    rel = f"local_content/aa/bb/{i:020d}"
    # Recency from the "database", scrambled against the walk's order.
    return CachedFile(rel, Kind.LOCAL_ORIGINAL, size, 0, 0, i, True, (i * 7919) % 1_000_003)


async def _stream(n: int, chunk: int = 2000) -> AsyncIterator[list[CachedFile]]:
    for start in range(0, n, chunk):
        yield [_file(i) for i in range(start, min(n, start + chunk))]


def test_select_keeps_just_the_oldest_that_cover_the_need() -> None:
    sel = asyncio.run(select_oldest(_stream(20_000), 10 * 100, max_files=1000))
    every = sorted((_file(i) for i in range(20_000)), key=lambda f: (f.last_access, f.rel))
    assert [f.rel for f in sel.files] == [f.rel for f in every[:10]]
    assert sel.more and sel.total_bytes == 20_000 * 100
    # The next round starts after the last file considered.
    last = sel.files[-1]
    nxt = asyncio.run(
        select_oldest(_stream(20_000), 5 * 100, max_files=1000, after=(last.last_access, last.rel))
    )
    assert [f.rel for f in nxt.files] == [f.rel for f in every[10:15]]
    # A cap on files wins over the bytes needed.
    capped = asyncio.run(select_oldest(_stream(20_000), 10**9, max_files=7))
    assert [f.rel for f in capped.files] == [f.rel for f in every[:7]]


def test_select_before_the_need_is_known_then_cover_it() -> None:
    """`cache evict`'s one walk: it selects before it knows the store's size, then keeps
    exactly what a selection with the need known beforehand keeps."""
    sizes = [100 + (i * 37) % 900 for i in range(5_000)]

    async def stream() -> AsyncIterator[list[CachedFile]]:
        for start in range(0, len(sizes), 700):
            yield [_file(i, sizes[i]) for i in range(start, min(len(sizes), start + 700))]

    unknown = asyncio.run(select_oldest(stream(), None, max_files=400))
    assert len(unknown.files) == 400 and unknown.more
    assert unknown.total_bytes == sum(sizes)
    for need in (-5, 0, 1, 100, 101, 5_000, 123_457, 10**9):
        known = asyncio.run(select_oldest(stream(), need, max_files=400))
        sel = asyncio.run(select_oldest(stream(), None, max_files=400))
        sel.cover(need)
        assert [f.rel for f in sel.files] == [f.rel for f in known.files][: len(sel.files)]
        if need > 0:
            assert [f.rel for f in sel.files] == [f.rel for f in known.files], need
        else:
            assert sel.files == [] and sel.more
    # Short of the need within the cap: all are kept, as many as the cap allows.
    sel = asyncio.run(select_oldest(stream(), None, max_files=400))
    sel.cover(10**9)
    assert len(sel.files) == 400


def test_select_memory_follows_the_work_not_the_store() -> None:
    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            sel = asyncio.run(select_oldest(_stream(n), 50 * 100, max_files=1000))
            assert len(sel.files) == 50
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(10_000), peak(200_000)
    # 20 times the store, about the same memory (one chunk and the 50 kept files).
    assert large < 1.5 * small, (small, large)


def _aged(i: int, size: int = 100) -> CachedFile:
    """As _file, with recencies spread over 11 days (hundreds of hour-wide buckets)."""
    f = _file(i, size)
    assert f.access_ms is not None
    f.access_ms *= 1000
    return f


async def _aged_stream(n: int, chunk: int = 2000) -> AsyncIterator[list[CachedFile]]:
    for start in range(0, n, chunk):
        yield [_aged(i) for i in range(start, min(n, start + chunk))]


def _key(f: CachedFile) -> tuple[float, str]:
    return (f.last_access, f.rel)


def test_recency_cutoff_is_where_the_oldest_buckets_reach_the_need() -> None:
    left = Recency(width=10.0)
    for when, size in ((5.0, 100), (15.0, 60), (18.0, 40), (55.0, 300)):
        left.add(
            CachedFile(
                "local_content/aa/bb/x", Kind.LOCAL_ORIGINAL, size, 0, 0, 0, True, int(when * 1000)
            )
        )
    assert left.bytes == {0: 100, 1: 100, 5: 300}
    assert left.cutoff(1) == (0, 0)
    assert left.cutoff(100) == (0, 0)
    assert left.cutoff(101) == (1, 100)
    assert left.cutoff(200) == (1, 100)
    assert left.cutoff(201) == (5, 200)
    assert left.cutoff(10**9) == (5, 200)  # short of the need: the newest bucket


def test_recency_buckets_widen_so_their_number_stays_bounded() -> None:
    left = Recency(width=1.0, max_buckets=8)
    for i in range(1000):
        left.add(_aged(i))
    assert len(left.bytes) <= 8 and sum(left.bytes.values()) == 1000 * 100
    assert left.width >= 1_000_003 / 8
    # Each file is in the bucket the final width gives it.
    counted: dict[int, int] = {}
    for i in range(1000):
        b = left.bucket(_aged(i).last_access)
        counted[b] = counted.get(b, 0) + 100
    assert counted == left.bytes


def test_a_sweep_takes_the_rest_of_the_need_in_one_walk() -> None:
    """After a first round of 300 files, one sweep hands out the next 4,700 oldest: exactly
    what 16 more rounds of 300 would, each file once, in one walk."""
    n, size, cap = 20_000, 100, 300
    every = sorted((_aged(i, size) for i in range(n)), key=_key)
    need = 5_000 * size
    sel = asyncio.run(select_oldest(_aged_stream(n), None, max_files=cap))
    sel.cover(need)
    assert [f.rel for f in sel.files] == [f.rel for f in every[:cap]]
    assert sum(sel.left.bytes.values()) == (n - cap) * size  # all but the kept
    after = _key(sel.files[-1])
    sweep = Sweep(sel.left, need - cap * size, after, max_files=cap)

    async def take() -> list[CachedFile]:
        return [f async for f in sweep.files(_aged_stream(n))]

    handed = asyncio.run(take())
    assert sorted(f.rel for f in handed) == sorted(f.rel for f in every[cap:5_000])
    # Files of the buckets before the cutoff come as the walk finds them (store order), the
    # cutoff bucket's after them, oldest first.
    edge = [f for f in handed if sweep.bucket(f.last_access) == sweep.cut]
    assert 0 < len(edge) < cap
    before = handed[: -len(edge)]
    assert [f.rel for f in before] == sorted(f.rel for f in before)
    assert all(sweep.bucket(f.last_access) < sweep.cut for f in before)
    assert handed[-len(edge) :] == sorted(edge, key=_key)
    assert sweep.more and sweep.last == _key(every[4_999])
    # What it left, by recency, for a round after it: every file not handed out.
    assert sum(sweep.left.bytes.values()) == (n - 5_000) * size


def test_a_sweep_short_of_the_need_hands_out_everything_left() -> None:
    n = 3_000
    every = sorted((_aged(i) for i in range(n)), key=_key)
    sel = asyncio.run(select_oldest(_aged_stream(n), None, max_files=100))
    sweep = Sweep(sel.left, 10**9, _key(sel.files[-1]), max_files=100_000)

    async def take() -> list[CachedFile]:
        return [f async for f in sweep.files(_aged_stream(n))]

    handed = asyncio.run(take())
    assert sorted(f.rel for f in handed) == sorted(f.rel for f in every[100:])
    assert not sweep.more and sweep.last == _key(every[-1])


def test_a_large_segment_is_cut_into_ranges_at_its_folders() -> None:
    folders = [f"{a}{b}" for a in "ABab" for b in "xyz"]  # 12 folders, in key order
    seg = "local_content/"
    # One range is enough below two ranges' worth of keys.
    assert range_bounds(seg, folders, RANGE_KEYS * 2 - 1) == []
    assert range_bounds(seg, folders[:1], RANGE_KEYS * 100) == []
    bounds = range_bounds(seg, folders, RANGE_KEYS * 4)
    assert len(bounds) == 3  # four ranges, the first from the segment's start
    assert bounds == sorted(bounds) and len(set(bounds)) == 3
    assert all(b.startswith(seg) and b.endswith("/") for b in bounds)
    assert all(b[len(seg) : -1] in folders for b in bounds)
    # Never more ranges than folders: ranges only start at a folder.
    assert len(range_bounds(seg, folders, RANGE_KEYS * 1000)) == len(folders) - 1


def test_ranges_are_planned_from_a_sample_of_the_store(tmp_path: Path) -> None:
    # 40 folders of 150 files each: about 6,000 keys, so three ranges.
    for i in range(40):
        for j in range(150):
            _touch(tmp_path, f"local_content/{i:02d}/{j:02d}/x")
    bounds = plan_ranges(str(tmp_path), "local_content/")
    assert len(bounds) == 6000 // RANGE_KEYS - 1
    assert bounds == sorted(bounds)
    assert plan_ranges(str(tmp_path), "remote_content/none/") == []


def test_background_passes_are_spaced_so_the_budget_walk_stays_a_small_share() -> None:
    # A small store: the configured interval.
    assert pause_after(60.0, 0.5) == 60.0
    assert pause_after(0.3, 0.0) == 0.3
    # A walk of 10 s (about a million files here) every 60 s would be a sixth of the time:
    # the next pass waits until the walk is WALK_SHARE of it.
    assert pause_after(60.0, 10.0) == 10.0 / WALK_SHARE == 100.0
    assert all(
        walk <= WALK_SHARE * pause_after(interval, walk) + 1e-9
        for interval in (0.2, 1.0, 60.0, 600.0)
        for walk in (0.0, 0.01, 1.0, 7.5, 30.0, 300.0)
    )
    # A pass that stopped at its limits still over budget: the next one comes after the
    # interval, whatever the walk took (it does not walk to measure first).
    assert pause_after(60.0, 10.0, unfinished=True) == 60.0
    assert pause_after(60.0, 0.5, unfinished=True) == 60.0
