"""Eviction: delete cached files, least recently accessed first, until the cache fits a budget,
and only files S3 is known, at that moment, to hold.

Candidates come from the streamed, annotated walk (inventory.chunks: recency and lengths from
the database, looked up by indexed columns, chunk by chunk) through a bounded heap that keeps
the oldest files covering the bytes to free (at most `ROUND_FILES`): memory follows the work,
never the store, and nothing sorts the whole store. Synapse has no index on `last_access_ts`,
so an `ORDER BY last_access_ts` would scan and sort the table just the same, and would miss
files without a row. A pass that needs more than one round's worth (`ROUND_FILES`), or
that skipped files left short, walks once more: the first walk also counted what it left
by recency (`Recency`, an hour-wide histogram), so the next one (a `Sweep`) evicts every
file older than the cutoff as it finds them and keeps only the cutoff hour's in a heap.
Two walks however much is to go (a million files and 10% to free: two, not three); more
only when a sweep, too, falls short (skipped files, or files accessed since the last walk).

For each candidate, in that order, one at a time per worker:
1. it must still be the file the walk saw (inode, size, mtime), and be at least `min_age`
   old by its mtime (a file Synapse is writing in place, or just wrote, is young);
2. S3 is asked (HeadObject) for the provider's key: it must hold an object of the file's
   size. A missing object is uploaded first with `upload_missing` (see upload.py for what
   may be uploaded) and checked again; otherwise the file is skipped and counted;
3. when the database records a sha256 and the object is small (`verify_sha256_max`), the
   object is read back and its sha256 compared; larger objects are checked by size only
   (ETags are not MD5s for multipart uploads, so they are never used);
4. right before `unlink` the file is checked again to be unchanged since step 1;
5. the now-empty folders above it are removed with `rmdir` (never `rmtree`), deepest
   first, stopping at the kind's top folder; a refill recreates them (fill.py retries).
Every step is idempotent and each deletion is a single `unlink` of a file S3 holds, so a
SIGKILL at any moment loses nothing and leaves nothing partial: the next run walks again.
S3 requests: one HeadObject (and, for small files with a sha256, one GET) per candidate
considered, which is per file evicted plus those skipped; none for the rest of the store.
URL-preview files and files outside Synapse's layout are never candidates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import hashlib
import heapq
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import structlog

from media_proxy import metrics, paths
from media_proxy.config import Config
from media_proxy.inventory import IN_S3, CachedFile, chunks, iter_walk
from media_proxy.metadata import Database, DatabaseError, open_database
from media_proxy.progress import Progress, Summary
from media_proxy.s3 import S3, S3Error
from media_proxy.upload import DEFAULT_VERIFY_SHA256_MAX, put_verified, refuse_reason, unchanged

log = structlog.get_logger("media_proxy.cache")

DEFAULT_MIN_AGE: Final = 86400.0
_HASH_CHUNK: Final = 1024 * 1024
# Background eviction: at most this many files per pass, and at most half the interval.
BACKGROUND_MAX_FILES: Final = 5000
# Candidates one round of a pass holds at most (a few hundred bytes each).
ROUND_FILES: Final = 50_000
# The recency histogram of what a round leaves (`Recency`): hour-wide buckets to begin with,
# and at most this many (a few hundred kB), whatever the store's span of access times.
BUCKET_S: Final = 3600.0
MAX_BUCKETS: Final = 4096


@dataclass(frozen=True)
class Rules:
    min_age: float = DEFAULT_MIN_AGE
    upload_missing: bool = False
    verify_sha256_max: int = DEFAULT_VERIFY_SHA256_MAX
    dry_run: bool = False


def prune_empty_dirs(root: str, rel: str) -> int:
    """rmdir the folders of `rel` that are now empty, deepest first, never the top folder.
    Stops at the first folder that is not empty (or is gone); returns how many went."""
    parts = rel.split("/")
    removed = 0
    for depth in range(len(parts) - 1, 1, -1):
        try:
            os.rmdir(os.path.join(root, *parts[:depth]))
        except OSError:
            break
        removed += 1
    return removed


def store_bytes(root: str) -> int:
    """The media folders' total size: a streamed walk, constant memory (blocking)."""
    return sum(f.size for f in iter_walk(root))


class _Newest:
    """A heap entry ordered newest first, so that the heap's top is the one to drop."""

    __slots__ = ("file", "key")

    def __init__(self, file: CachedFile) -> None:
        self.file = file
        self.key = (file.last_access, file.rel)

    def __lt__(self, other: _Newest) -> bool:
        return self.key > other.key


class Recency:
    """Bytes per recency bucket (last access, `width` seconds each) of the evictable files a
    walk saw and left for a later round. From it the next round knows, before walking, which
    files it will take: all of the buckets older than the one where the need is reached.
    Buckets start an hour wide and double whenever more than `max_buckets` are in use, so
    its size never follows the store's."""

    def __init__(self, width: float = BUCKET_S, max_buckets: int = MAX_BUCKETS) -> None:
        self.width, self.max_buckets = width, max_buckets
        self.bytes: dict[int, int] = {}

    def bucket(self, last_access: float) -> int:
        return int(last_access // self.width)

    def add(self, f: CachedFile) -> None:
        b = self.bucket(f.last_access)
        self.bytes[b] = self.bytes.get(b, 0) + f.size
        if len(self.bytes) > self.max_buckets:
            merged: dict[int, int] = {}
            for b, n in self.bytes.items():
                merged[b // 2] = merged.get(b // 2, 0) + n
            self.bytes, self.width = merged, self.width * 2

    def cutoff(self, need: int) -> tuple[int, int]:
        """(the oldest bucket at which the bytes of it and all older ones reach `need`, the
        bytes of those older ones); the newest bucket when all of them fall short."""
        before = 0
        buckets = sorted(self.bytes)
        for b in buckets:
            if before + self.bytes[b] >= need or b == buckets[-1]:
                return b, before
            before += self.bytes[b]
        return 0, 0


class _Oldest:
    """The oldest files offered (recency, then store path), as few as cover `need` bytes and
    at most `max_files`: a bounded heap, O(kept) memory, O(n log kept) time. With `need`
    unknown (None), the `max_files` oldest. What it leaves out is counted in `left`."""

    def __init__(self, need: int | None, max_files: int, left: Recency) -> None:
        self.need, self.max_files, self.left = need, max_files, left
        self.heap: list[_Newest] = []
        self.held = 0
        self.more = False  # files were left out: another round may follow

    def offer(self, f: CachedFile) -> None:
        heap, need = self.heap, self.need
        item = _Newest(f)
        enough = len(heap) >= self.max_files or (need is not None and self.held >= need)
        if heap and enough and item.key >= heap[0].key:
            self.more = True  # newer than every file kept, and enough is kept
            self.left.add(f)
            return
        heapq.heappush(heap, item)
        self.held += f.size
        while heap and (
            len(heap) > self.max_files
            or (need is not None and self.held - heap[0].file.size >= max(need, 1))
        ):
            dropped = heapq.heappop(heap).file
            self.held -= dropped.size
            self.more = True
            self.left.add(dropped)

    def files(self) -> list[CachedFile]:
        return [item.file for item in sorted(self.heap, key=lambda i: i.key)]


@dataclass
class Selection:
    """One round's candidates (oldest first) and what the walk saw on the way."""

    files: list[CachedFile] = field(default_factory=list)
    total_bytes: int = 0
    not_in_s3_bytes: int = 0
    more: bool = False  # older-than-the-rest files were left out: another round may follow
    left: Recency = field(default_factory=Recency)  # what was left out, by recency

    def cover(self, need: int) -> None:
        """Keep the fewest oldest files that cover `need` bytes (all of them if they fall
        short), as a round with the need known beforehand would have kept."""
        held = 0
        for i, f in enumerate(self.files):
            if held >= need:
                for dropped in self.files[i:]:
                    self.left.add(dropped)
                del self.files[i:]
                self.more = True
                return
            held += f.size


async def select_oldest(
    batches: AsyncIterator[list[CachedFile]],
    need: int | None,
    *,
    max_files: int,
    after: tuple[float, str] | None = None,
) -> Selection:
    """The oldest evictable files (recency, then store path) strictly after `after`, as few
    as cover `need` bytes and at most `max_files` (`_Oldest`). With `need` unknown (None:
    the walk is also what measures the store), the `max_files` oldest, for the caller to
    `cover` once it knows."""
    sel = Selection()
    oldest = _Oldest(need, max_files, sel.left)
    async for chunk in batches:
        for f in chunk:
            sel.total_bytes += f.size
            if f.kind not in IN_S3:
                sel.not_in_s3_bytes += f.size
                continue
            if after is not None and (f.last_access, f.rel) <= after:
                continue
            oldest.offer(f)
    sel.files, sel.more = oldest.files(), oldest.more
    return sel


class Sweep:
    """A round after the first, planned from what the rounds before left (`Recency`): every
    file of the buckets older than the cutoff is to go, so each is handed out as the walk
    finds it (in store order: all of them are older than any file kept); the cutoff bucket's
    files go through a bounded heap and are handed out oldest first once the walk ends.
    However many files the need covers, one walk takes them, where rounds of heaps alone
    take one walk per `ROUND_FILES` files (three walks of a million files to free 10%)."""

    def __init__(
        self, left: Recency, need: int, after: tuple[float, str] | None, *, max_files: int
    ) -> None:
        self.cut, before = left.cutoff(need)
        self.bucket = left.bucket
        self.oldest = _Oldest(need - before, max_files, Recency(left.width))
        self.after = after
        self.last = after  # the newest (recency, path) handed out: where a next round starts
        self.more = False

    @property
    def left(self) -> Recency:
        return self.oldest.left

    def _handed(self, f: CachedFile) -> CachedFile:
        key = (f.last_access, f.rel)
        if self.last is None or key > self.last:
            self.last = key
        return f

    async def files(
        self, batches: AsyncIterator[list[CachedFile]]
    ) -> AsyncGenerator[CachedFile, None]:
        after, cut = self.after, self.cut
        try:
            async for chunk in batches:
                for f in chunk:
                    if f.kind not in IN_S3:
                        continue
                    if after is not None and (f.last_access, f.rel) <= after:
                        continue
                    b = self.bucket(f.last_access)
                    if b < cut:
                        yield self._handed(f)
                    elif b > cut:
                        self.more = True
                        self.left.add(f)
                    else:
                        self.oldest.offer(f)
        finally:
            close = getattr(batches, "aclose", None)
            if close is not None:
                await close()
        self.more = self.more or self.oldest.more
        for f in self.oldest.files():
            yield self._handed(f)


async def s3_sha256(s3: S3, rel: str) -> str | None:
    """The sha256 of the S3 object's content (read in full), or None if it is gone."""
    obj = await s3.open(rel)
    if obj is None:
        return None
    try:
        h = hashlib.sha256()
        async for chunk in obj.chunks(_HASH_CHUNK):
            h.update(chunk)
        return h.hexdigest()
    finally:
        obj.close()


class Evictor:
    """One eviction pass over an inventory."""

    def __init__(
        self, s3: S3, root: str, rules: Rules, *, concurrency: int = 8, show_progress: bool = True
    ) -> None:
        self.s3, self.root, self.rules = s3, root, rules
        self.concurrency = max(1, concurrency)
        self.show_progress = show_progress

    async def run(
        self,
        walk: Callable[[], AsyncIterator[list[CachedFile]]],
        total: int | None,
        max_size: int,
        *,
        max_files: int | None = None,
        time_limit: float | None = None,
        round_files: int = ROUND_FILES,
    ) -> Summary:
        """Free `total - max_size` bytes. `total` is the store's size (`store_bytes`), or None
        for the first round's walk to measure it on the way: one walk of the store instead of
        two, at the price of keeping up to `ROUND_FILES` candidates until the walk ends.
        `walk` starts a new annotated walk of the store (inventory.chunks) for each round:
        the first round's heap, then sweeps (`Sweep`) planned from what the rounds before
        left, `round_files` bounding what any round keeps.
        `time_limit` bounds the time spent evicting, not walking, and each round evicts (or
        considers) at least one file: a store whose walk outlasts the limit (a million files
        take about 40 s here) must still shrink, pass after pass."""
        started = time.monotonic()
        summary = Summary("would evict" if self.rules.dry_run else "evicted")
        need = None if total is None else total - max_size
        summary.extra.update(
            budget_bytes=max_size,
            before_bytes=total,
            kept_not_in_s3_bytes=0,
            uploaded_files=0,
            rounds=0,
        )
        freed = 0
        evicting = 0.0  # seconds spent in rounds, which the time limit counts
        after: tuple[float, str] | None = None
        left: Recency | None = None  # what the rounds so far left, once one has run
        stopped = ""
        progress: Progress | None = None
        try:
            while (need is None or freed < need) and not stopped:
                cap = (
                    round_files
                    if max_files is None
                    else min(round_files, max_files - summary.files)
                )
                summary.extra["rounds"] += 1
                sweep: Sweep | None = None
                if left is None or need is None:
                    sel = await select_oldest(
                        walk(),
                        None if need is None else need - freed,
                        max_files=max(cap, 1),
                        after=after,
                    )
                    summary.extra["kept_not_in_s3_bytes"] = sel.not_in_s3_bytes
                    if need is None:  # the first round's walk measured the store
                        total = sel.total_bytes
                        need = total - max_size
                        summary.extra["before_bytes"] = total
                        sel.cover(need)
                    if not sel.files:
                        break
                    candidates = _each(sel.files)
                    if self.show_progress:
                        progress = progress or Progress("cache_evict", 0, max(need, 0))
                        progress.total_files += len(sel.files)
                else:
                    sweep = Sweep(left, need - freed, after, max_files=max(cap, 1))
                    candidates = sweep.files(walk())
                    if self.show_progress:
                        progress = progress or Progress("cache_evict", 0, max(need, 0))
                remaining = None if time_limit is None else time_limit - evicting
                got, stopped, seconds = await self._round(
                    candidates,
                    need - freed,
                    summary,
                    progress,
                    max_files=max_files,
                    time_limit=remaining,
                    count=sweep is not None,
                )
                evicting += seconds
                freed += got
                if sweep is None:
                    last = sel.files[-1]
                    after, left, more = (last.last_access, last.rel), sel.left, sel.more
                else:
                    after, left, more = sweep.last, sweep.left, sweep.more
                if not more:
                    break
        finally:
            if progress is not None:
                progress.close()
        summary.seconds = time.monotonic() - started
        after_bytes = (total or 0) - freed
        summary.extra.update(
            after_bytes=after_bytes, over_budget_bytes=max(0, after_bytes - max_size)
        )
        if stopped:
            summary.extra["stopped"] = stopped
        return summary

    async def _round(
        self,
        candidates: AsyncGenerator[CachedFile, None],
        need: int,
        summary: Summary,
        progress: Progress | None,
        *,
        max_files: int | None,
        time_limit: float | None,
        count: bool = False,
    ) -> tuple[int, str, float]:
        """Evict candidates in order, `concurrency` at a time, until `need` bytes are freed;
        returns the bytes freed, why it stopped early ("" if it did not) and the seconds it
        spent evicting (waiting for the next candidate, a sweep's walk, not counted). The
        time limit is checked from the second candidate on: a round always makes progress.
        `count`: the candidates were not counted in the progress beforehand."""
        started = time.monotonic()
        walking = 0.0
        freed = inflight = launched = 0
        pending: set[asyncio.Task[int]] = set()
        stopped = ""

        async def settle(wait_all: bool = False) -> None:
            if pending:
                when = asyncio.ALL_COMPLETED if wait_all else asyncio.FIRST_COMPLETED
                done, _ = await asyncio.wait(pending, return_when=when)
                pending.difference_update(done)
                for task in done:
                    task.result()  # a bug in a worker stops the pass

        def launch(f: CachedFile) -> None:
            nonlocal inflight, launched
            inflight += f.size
            launched += 1

            def finished(task: asyncio.Task[int]) -> None:
                nonlocal inflight, freed
                inflight -= f.size
                if not task.cancelled() and task.exception() is None:
                    freed += task.result()
                    if progress is not None:
                        progress.advance(1, task.result())

            task = asyncio.create_task(self._one(f, summary))
            task.add_done_callback(finished)
            pending.add(task)

        try:
            while True:
                asked = time.monotonic()
                f = await anext(candidates, None)
                walking += time.monotonic() - asked
                if f is None:
                    break
                while pending and (freed + inflight >= need or len(pending) >= self.concurrency):
                    await settle()
                if freed >= need:
                    break
                if max_files is not None and summary.files + len(pending) >= max_files:
                    stopped = "max_files"
                    break
                spent = time.monotonic() - started - walking
                if launched and time_limit is not None and spent > time_limit:
                    stopped = "time_limit"
                    break
                if count and progress is not None:
                    progress.total_files += 1
                launch(f)
            await settle(wait_all=True)
        finally:
            for task in pending:
                task.cancel()
            await candidates.aclose()
        return freed, stopped, time.monotonic() - started - walking

    async def _one(self, f: CachedFile, summary: Summary) -> int:
        """Evict one file if every rule allows; returns the bytes freed (or planned)."""
        try:
            reason = await self._evict(f, summary)
        except OSError as e:  # e.g. no permission to unlink: the file stays
            log.warning("cache_evict.error", rel=f.rel, error=str(e))
            reason = "os_error"
        if reason is not None:
            summary.skip(reason, f.size)
            return 0
        summary.done(f.size)
        return f.size

    async def _evict(self, f: CachedFile, summary: Summary) -> str | None:
        rules = self.rules
        path = paths.in_store(self.root, f.rel)
        if not unchanged(path, f):
            return "changed"
        if f.age() < rules.min_age:
            return "too_young"
        try:
            s3_size = await self.s3.size(f.rel)
        except S3Error as e:
            log.warning("cache_evict.head_failed", rel=f.rel, error=str(e))
            return "s3_error"
        uploaded = False
        if s3_size is None:
            if not rules.upload_missing:
                return "not_in_s3"
            refused = await refuse_reason(self.root, f, verify_sha256_max=rules.verify_sha256_max)
            if refused is not None:
                return f"not_in_s3_and_{refused}"
            if not rules.dry_run:
                failed = await put_verified(self.s3, self.root, f)
                if failed is not None:
                    return f"upload_{failed}"
                summary.extra["uploaded_files"] += 1
            uploaded = True
        elif s3_size != f.size:
            return "size_differs_in_s3"
        if f.sha256 and f.size <= rules.verify_sha256_max and not (uploaded and rules.dry_run):
            try:
                digest = await s3_sha256(self.s3, f.rel)
            except S3Error as e:
                log.warning("cache_evict.get_failed", rel=f.rel, error=str(e))
                return "s3_error"
            if digest != f.sha256:
                return "sha256_differs_in_s3"
        if rules.dry_run:
            when = datetime.datetime.fromtimestamp(f.last_access, datetime.UTC)
            action = "upload+evict" if uploaded else "evict"
            print(f"{action} {f.rel} {f.size} last_access={when:%Y-%m-%dT%H:%M:%SZ}", flush=True)
            return None
        if not unchanged(path, f):
            return "changed"
        try:
            os.unlink(path)
        except FileNotFoundError:
            return "changed"
        prune_empty_dirs(self.root, f.rel)
        log.debug("cache_evict.file", rel=f.rel, bytes=f.size)
        return None


async def _each(files: list[CachedFile]) -> AsyncGenerator[CachedFile, None]:
    for f in files:
        yield f


class DirLock:
    """An flock on the cache directory itself (outside every folder anyone else uses), so
    that one process among the workers sharing a cache runs the background evictor; the
    kernel drops it when that process dies, and another worker takes over."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fd = -1

    def acquire(self) -> bool:
        if self.fd >= 0:
            return True
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# Walking the store to check the budget takes at most this share of the background
# evictor's time: a million files take about 10 s to walk here, which every minute would
# keep a fifth of a core busy for a cache that is under budget.
WALK_SHARE: Final = 0.1


def pause_after(interval: float, walk_seconds: float, *, unfinished: bool = False) -> float:
    """Seconds from one background pass to the next: the interval, stretched so that the
    budget walk stays within WALK_SHARE of the time on a store too large for it; just the
    interval after a pass that stopped at its limits still over budget (the next one walks
    once, measuring as it selects, and goes on evicting)."""
    return interval if unfinished else max(interval, walk_seconds / WALK_SHARE)


class BackgroundEvictor:
    """`serve --cache-max-size`: one bounded eviction pass per interval (stretched on stores
    whose walk takes long, see WALK_SHARE), in the evictor's own process."""

    def __init__(self, config: Config, s3: S3) -> None:
        assert config.cache_max_size is not None
        self.config, self.s3 = config, s3
        self.max_size = config.cache_max_size
        self.interval = config.cache_evict_interval
        self.rules = Rules(min_age=config.cache_min_age)
        self.lock = DirLock(config.cache_path)
        self.db: Database | None = None
        self._task: asyncio.Task[None] | None = None
        self.walk_seconds = 0.0  # the last budget walk's
        self.unfinished = False  # the last pass stopped at its limits, still over budget

    async def start(self) -> None:
        self.config.cache_path.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(
                pause_after(self.interval, self.walk_seconds, unfinished=self.unfinished)
            )
            try:
                await self.tick()
            except (DatabaseError, S3Error, OSError) as e:
                log.warning("cache_evict.pass_failed", error=str(e))
            except Exception:
                log.exception("cache_evict.pass_failed")

    async def tick(self) -> Summary | None:
        """One pass, if this process holds the evictor lock and the cache is over budget."""
        if not self.lock.acquire():
            return None
        root = str(self.config.cache_path)
        total: int | None = None  # unknown: the pass's own walk measures it
        if not self.unfinished:
            started = time.monotonic()
            total = await asyncio.to_thread(store_bytes, root)
            self.walk_seconds = time.monotonic() - started
            metrics.store_size(total)
            metrics.evictor_walk(self.walk_seconds)  # what spaces the passes (pause_after)
            if total <= self.max_size:
                return None  # under budget: no database work
        if self.db is None:
            self.db = await open_database(self.config.database)
        db = self.db
        evictor = Evictor(self.s3, root, self.rules, show_progress=False)
        summary = await evictor.run(
            lambda: chunks(root, db),
            total,
            self.max_size,
            max_files=BACKGROUND_MAX_FILES,
            time_limit=self.interval / 2,
        )
        self.unfinished = bool(summary.extra.get("over_budget_bytes")) and (
            "stopped" in summary.extra
        )
        metrics.evicted(summary.files, summary.bytes)
        metrics.store_size(summary.extra.get("after_bytes", 0))
        if summary.files or summary.skipped:
            # budget_walk_s: the walk that found the store over budget; absent when the pass
            # went on from an unfinished one, measuring the store as it selected
            walked = {} if total is None else {"budget_walk_s": round(self.walk_seconds, 3)}
            log.info("cache_evict.pass", **summary.as_dict(), **walked)
        if summary.extra.get("over_budget_bytes") and "stopped" not in summary.extra:
            log.warning(
                "cache.over_budget",
                detail="cache over budget and nothing more evictable",
                **summary.as_dict(),
            )
        return summary

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.db is not None:
            await self.db.close()
        self.lock.release()
