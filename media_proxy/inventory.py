"""What the cache holds: every file of the media folders, its kind, and what the database says.

The walk only enters Synapse's media folders (never `.media-proxy/`, where fills live, nor
anything else), never follows symlinks, and counts regular files only. Each file is then
matched with its database row, built back into a store path with paths.py (so a file whose
name is not what Synapse would write is never matched), to learn:
- recency: the row's `last_access_ts`, else its `created_ts`; files without a row (deleted
  media, or a write Synapse has not recorded yet) use the later of their mtime and atime;
  thumbnails use their media's row, since Synapse (and the proxy) mark the media, not the
  thumbnail, as accessed;
- the length the database expects (`media_length`, `thumbnail_length`), and the sha256 of
  originals when Synapse recorded one;
- whether it is URL-preview media (the `url_cache*` folders, or a row with `url_cache` set):
  never in S3, never evicted, never uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import stat
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from media_proxy import paths
from media_proxy.metadata import Database, StoreRow, ThumbnailRow
from media_proxy.s3 import S3, S3Error


class Kind(StrEnum):
    LOCAL_ORIGINAL = "local_originals"
    LOCAL_THUMBNAIL = "local_thumbnails"
    REMOTE_ORIGINAL = "remote_originals"
    REMOTE_THUMBNAIL = "remote_thumbnails"
    URL_PREVIEW = "url_previews"
    # A file in a media folder at a place Synapse never writes (a leftover, a temp file).
    OTHER = "other"


# Top folder -> (kind, number of path components of a file of that kind).
TOP_FOLDERS: Final = {
    "local_content": (Kind.LOCAL_ORIGINAL, 4),
    "local_thumbnails": (Kind.LOCAL_THUMBNAIL, 5),
    "remote_content": (Kind.REMOTE_ORIGINAL, 5),
    "remote_thumbnail": (Kind.REMOTE_THUMBNAIL, 6),
    "url_cache": (Kind.URL_PREVIEW, 0),
    "url_cache_thumbnails": (Kind.URL_PREVIEW, 0),
}
# Kinds the S3 provider stores, and so kinds eviction and upload may act on.
IN_S3: Final = frozenset(
    {Kind.LOCAL_ORIGINAL, Kind.LOCAL_THUMBNAIL, Kind.REMOTE_ORIGINAL, Kind.REMOTE_THUMBNAIL}
)
# Files per chunk of the streamed walk (one batch of database lookups each).
CHUNK: Final = 2000
# A segment's listing is cut into ranges of about this many keys (two pages), listed
# LIST_WINDOW at a time: S3 servers list several ranges at once faster than one.
RANGE_KEYS: Final = 2000
LIST_WINDOW: Final = 8


@dataclass(slots=True)
class CachedFile:
    rel: str
    kind: Kind
    size: int
    mtime_ns: int
    atime_ns: int
    ino: int
    has_row: bool = False
    access_ms: int | None = None  # last_access_ts, else created_ts, of the row
    expected_size: int | None = None  # what the database says the file holds
    sha256: str | None = None

    @property
    def last_access(self) -> float:
        """Seconds since the epoch: the database's access time, else the file's own times."""
        if self.access_ms is not None:
            return self.access_ms / 1000
        return max(self.mtime_ns, self.atime_ns) / 1e9

    def age(self, now: float | None = None) -> float:
        """Seconds since the file was last written (mtime)."""
        return (time.time() if now is None else now) - self.mtime_ns / 1e9

    @property
    def media_key(self) -> str:
        """The media this file belongs to: "<media_id>" or "<server>/<filesystem_id>"."""
        parts = self.rel.split("/")
        if self.kind in (Kind.LOCAL_ORIGINAL, Kind.LOCAL_THUMBNAIL):
            return "".join(parts[1:4])
        if self.kind in (Kind.REMOTE_ORIGINAL, Kind.REMOTE_THUMBNAIL):
            return parts[1] + "/" + "".join(parts[2:5])
        return ""


def classify(rel: str) -> Kind | None:
    """The kind of the file at `rel`, or None outside the media folders."""
    parts = rel.split("/")
    entry = TOP_FOLDERS.get(parts[0])
    if entry is None:
        return None
    kind, depth = entry
    if depth and len(parts) != depth:
        return Kind.OTHER
    return kind


def _entries(path: str) -> list[tuple[str, bool]]:
    """(name, is a folder) of a folder's entries, sorted so that full store paths come out in
    S3's key order (UTF-8 binary, which is Python's code point order): a folder sorts as its
    name followed by "/", as its files' keys do."""
    try:
        with os.scandir(path) as it:
            found = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    found.sort(key=lambda e: e[0] + "/" if e[1] else e[0])
    return found


def _below(root: str, rel_dir: str, after: str) -> Iterator[CachedFile]:
    prefix = rel_dir + "/"
    if after >= prefix and not after.startswith(prefix):
        return  # every path below sorts before `after`: done in an earlier run
    for name, is_dir in _entries(os.path.join(root, rel_dir)):
        rel = prefix + name
        if is_dir:
            yield from _below(root, rel, after)
            continue
        if rel <= after:
            continue
        try:
            st = os.lstat(os.path.join(root, rel))
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        kind = classify(rel)
        assert kind is not None
        yield CachedFile(rel, kind, st.st_size, st.st_mtime_ns, st.st_atime_ns, st.st_ino)


def iter_walk(root: str, after: str = "") -> Iterator[CachedFile]:
    """Every regular file in the media folders below `root`, streamed in S3's key order (so
    it merges with a ListObjectsV2 listing), starting after the store path `after` (a walk
    resumes where another stopped). Memory: one folder's names per level, never the store.
    Blocking: run it in a thread."""
    for top in sorted(TOP_FOLDERS, key=lambda t: t + "/"):
        yield from _below(root, top, after)


def walk(root: str) -> list[CachedFile]:
    """Every regular file in the media folders below `root`, as a list (small stores, tests)."""
    return list(iter_walk(root))


async def chunks(
    root: str, db: Database, *, size: int = CHUNK, after: str = ""
) -> AsyncIterator[list[CachedFile]]:
    """The streamed walk, `size` files at a time, each chunk annotated from the database
    (batched lookups by indexed columns): bounded memory whatever the store holds. The next
    chunk is walked (in a thread) while this one is annotated and used: two in memory."""
    files = iter_walk(root, after)

    def take() -> list[CachedFile]:
        return list(itertools.islice(files, size))

    ahead = asyncio.ensure_future(asyncio.to_thread(take))
    try:
        while chunk := await ahead:
            ahead = asyncio.ensure_future(asyncio.to_thread(take))
            await annotate(db, chunk)
            yield chunk
    finally:
        ahead.cancel()  # a thread still walking finishes its chunk on its own


def _apply(file: CachedFile, row: StoreRow, *, original: bool) -> None:
    file.has_row = True
    file.access_ms = row.last_access_ts if row.last_access_ts is not None else row.created_ts
    if row.url_cache:
        file.kind = Kind.URL_PREVIEW
    if original:
        file.expected_size = row.media_length
        file.sha256 = row.sha256.lower() if row.sha256 else None


def _thumbnail_rels(row: ThumbnailRow) -> Iterable[str]:
    try:
        if not row.server_name:
            yield paths.local_thumbnail(
                row.media_id, row.width, row.height, row.content_type, row.method
            )
            return
        rel = paths.remote_thumbnail(
            row.server_name, row.filesystem_id, row.width, row.height, row.content_type, row.method
        )
        yield rel
        # Synapse also looks for (and the provider may hold) the legacy name, without method.
        yield rel.rsplit("-", 1)[0]
    except (paths.PathError, ValueError):
        return


async def annotate(db: Database, files: list[CachedFile]) -> None:
    """Fill in each file's row-derived fields from Synapse's database."""
    by_rel = {f.rel: f for f in files}
    thumbnails: dict[tuple[Kind, str], list[CachedFile]] = {}
    for f in files:
        if f.kind in (Kind.LOCAL_THUMBNAIL, Kind.REMOTE_THUMBNAIL):
            thumbnails.setdefault((f.kind, f.media_key), []).append(f)

    local_ids = sorted(
        {f.media_key for f in files if f.kind in (Kind.LOCAL_ORIGINAL, Kind.LOCAL_THUMBNAIL)}
    )
    if local_ids:
        for media_id, row in (await db.store_local_rows(local_ids)).items():
            with contextlib.suppress(paths.PathError):
                if (orig := by_rel.get(paths.local_media(media_id))) is not None:
                    _apply(orig, row, original=True)
            for f in thumbnails.get((Kind.LOCAL_THUMBNAIL, media_id), []):
                _apply(f, row, original=False)
        for thumb in await db.store_local_thumbnails(local_ids):
            _set_thumbnail_length(by_rel, thumb)

    remote: dict[str, set[str]] = {}  # origin -> filesystem ids of this chunk's files
    for f in files:
        if f.kind in (Kind.REMOTE_ORIGINAL, Kind.REMOTE_THUMBNAIL):
            origin, fid = f.media_key.split("/", 1)
            remote.setdefault(origin, set()).add(fid)
    for origin, fids in remote.items():
        rows = await db.store_remote_rows_of(origin, sorted(fids))
        fid_of: dict[str, str] = {}
        for fid, (media_id, row) in rows.items():
            fid_of[media_id] = fid
            key = f"{origin}/{fid}"
            with contextlib.suppress(paths.PathError):
                if (orig := by_rel.get(paths.remote_media(origin, fid))) is not None:
                    _apply(orig, row, original=True)
            for f in thumbnails.get((Kind.REMOTE_THUMBNAIL, key), []):
                _apply(f, row, original=False)
        if fid_of:
            for thumb in await db.store_remote_thumbnails_of(origin, sorted(fid_of)):
                # Paths come from the media row's filesystem_id, as Synapse builds them.
                fid = fid_of[thumb.media_id]
                _set_thumbnail_length(
                    by_rel, dataclasses.replace(thumb, server_name=origin, filesystem_id=fid)
                )


def _set_thumbnail_length(by_rel: dict[str, CachedFile], thumb: ThumbnailRow) -> None:
    for rel in _thumbnail_rels(thumb):
        f = by_rel.get(rel)
        if f is not None and f.kind != Kind.URL_PREVIEW:
            f.expected_size = thumb.length


async def inventory(root: str, db: Database) -> list[CachedFile]:
    """The whole annotated store as a list (small stores, tests; commands stream `chunks`)."""
    return [f async for chunk in chunks(root, db) for f in chunk]


def segment(rel: str) -> str:
    """The listing prefix under which a file's S3 key is looked up: its top folder, or its
    origin's folder for remote media. Keys of one segment are contiguous in key order, and
    within one the walk's order and the listing's agree whatever separator sorting a store
    uses (an origin "a.b" against "a" is where they could differ)."""
    parts = rel.split("/", 2)
    if parts[0] in ("remote_content", "remote_thumbnail") and len(parts) == 3:
        return f"{parts[0]}/{parts[1]}/"
    return parts[0] + "/"


Entry = tuple[str, int, float]  # a listed object: store path, size, LastModified


def range_bounds(seg: str, folders: list[str], keys: int) -> list[str]:
    """Where a listing of `seg` (whose folder holds `folders`, in key order, and an estimated
    `keys` files below) is cut so that each range holds about RANGE_KEYS keys: the store
    path of every k-th folder ("seg/name/"). Ranges only ever start at a folder, so a
    segment of few folders gets fewer, larger ranges; none when one range is enough."""
    n = min(len(folders), keys // RANGE_KEYS)
    if n <= 1:
        return []
    step = len(folders) / n
    return [f"{seg}{folders[int(i * step)]}/" for i in range(1, n)]


def _count_files(path: str) -> int:
    total = 0
    for name, is_dir in _entries(path):
        total += _count_files(os.path.join(path, name)) if is_dir else 1
    return total


def plan_ranges(root: str, seg: str) -> list[str]:
    """range_bounds for `seg` of the store at `root`, the keys estimated from a few of its
    folders (the first, middle and last): a few hundred directory reads, whatever the
    store's size. Blocking: run it in a thread."""
    entries = _entries(os.path.join(root, seg))
    folders = [name for name, is_dir in entries if is_dir]
    if len(folders) <= 1:
        return []
    picks = sorted({0, len(folders) // 2, len(folders) - 1})
    per_folder = sum(_count_files(os.path.join(root, seg, folders[i])) for i in picks) / len(picks)
    return range_bounds(seg, folders, int(per_folder * len(folders)))


async def ranged_pages(
    s3: S3, seg: str, bounds: list[str], *, window: int = LIST_WINDOW, page_size: int = 1000
) -> AsyncGenerator[list[Entry], None]:
    """The listing of `seg` in key order, as pages: the ranges [seg, b1), [b1, b2), ...
    [bn, end) are listed `window` at a time, each up to two pages ahead of its reader. The
    same keys as one listing (every key falls in exactly one range), sooner where the S3
    server answers several requests at once faster than one after another."""
    starts: list[str | None] = [None, *bounds]
    ends: list[str | None] = [*bounds, None]
    running: dict[int, tuple[asyncio.Queue[list[Entry] | Exception | None], asyncio.Task[None]]]
    running = {}

    async def fill(i: int, queue: asyncio.Queue[list[Entry] | Exception | None]) -> None:
        lo, hi = starts[i], ends[i]
        # Keys after "seg/name/": that folder's and on. (Not after "seg/name": SeaweedFS
        # takes that for the folder and skips all of it.) Keys before `lo` are dropped.
        pages = aiter(s3.list_pages(seg, page_size=page_size, start_after=lo))
        try:
            async for page in pages:
                if lo is not None:  # only a range's first page can hold keys before it
                    page = [e for e in page if e[0] >= lo]
                    lo = None
                if hi is not None and page and page[-1][0] >= hi:
                    await queue.put([e for e in page if e[0] < hi])
                    break
                await queue.put(page)
            await queue.put(None)
        except Exception as e:  # S3Error and the like: raised in the reader's order
            await queue.put(e)
        finally:
            with contextlib.suppress(RuntimeError):
                await pages.aclose()  # type: ignore[attr-defined]

    def start(i: int) -> None:
        queue: asyncio.Queue[list[Entry] | Exception | None] = asyncio.Queue(maxsize=2)
        running[i] = (queue, asyncio.create_task(fill(i, queue)))

    try:
        for i in range(min(window, len(starts))):
            start(i)
        for i in range(len(starts)):
            queue, _ = running[i]
            while (item := await queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                yield item
            del running[i]
            if i + window < len(starts):
                start(i + window)
    finally:
        tasks = [task for _, task in running.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ListingJoin:
    """S3's size of each file, from ListObjectsV2 pages (1,000 keys a request) merged with
    the walk: the files must be asked for in the walk's (key) order. Given the store's
    `root`, a large segment is listed as ranges, several at once; ranged_pages fetches
    every range ahead of the join, a bounded number of pages."""

    def __init__(self, s3: S3, root: str | None = None) -> None:
        self.s3 = s3
        self.root = root
        self._segment: str | None = None
        self._pages: AsyncGenerator[list[Entry], None] | None = None
        self._page: list[Entry] = []
        self._i = 0
        self._last = ""
        self.pages = 0
        self.ranges = 0

    async def size(self, rel: str) -> int | None:
        """The size S3 lists for `rel`, or None when the listing has no such key."""
        seg = segment(rel)
        if seg != self._segment:
            await self.close()
            self._segment, self._page, self._i, self._last = seg, [], 0, ""
            bounds = await asyncio.to_thread(plan_ranges, self.root, seg) if self.root else []
            self.ranges += len(bounds) + 1
            self._pages = ranged_pages(self.s3, seg, bounds)
        while True:
            while self._i < len(self._page):
                key, size, _ = self._page[self._i]
                if key < self._last:
                    raise S3Error(
                        f"ListObjectsV2 {seg}: keys out of order ({key} after {self._last})"
                    )
                self._last = key
                if key > rel:
                    return None
                self._i += 1
                if key == rel:
                    return size
            if self._pages is None:
                return None
            try:
                self._page, self._i = await anext(self._pages), 0
            except StopAsyncIteration:
                self._pages, self._page, self._i = None, [], 0
                continue
            self.pages += 1

    async def close(self) -> None:
        pages, self._pages = self._pages, None
        if pages is not None:
            await pages.aclose()  # stops the ranges still being listed
