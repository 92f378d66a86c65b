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
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from media_proxy import paths
from media_proxy.metadata import Database, StoreRow, ThumbnailRow


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


def walk(root: str) -> list[CachedFile]:
    """Every regular file in the media folders below `root` (blocking: run it in a thread)."""
    files: list[CachedFile] = []
    for top in TOP_FOLDERS:
        stack = [top]
        while stack:
            rel_dir = stack.pop()
            try:
                entries = list(os.scandir(os.path.join(root, rel_dir)))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}"
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(rel)
                        continue
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if not stat.S_ISREG(st.st_mode):
                    continue
                kind = classify(rel)
                assert kind is not None
                files.append(
                    CachedFile(rel, kind, st.st_size, st.st_mtime_ns, st.st_atime_ns, st.st_ino)
                )
    return files


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

    remote_keys = {
        f.media_key for f in files if f.kind in (Kind.REMOTE_ORIGINAL, Kind.REMOTE_THUMBNAIL)
    }
    if remote_keys:
        for (server, fid), row in (await db.store_remote_rows()).items():
            key = f"{server}/{fid}"
            if key not in remote_keys:
                continue
            with contextlib.suppress(paths.PathError):
                if (orig := by_rel.get(paths.remote_media(server, fid))) is not None:
                    _apply(orig, row, original=True)
            for f in thumbnails.get((Kind.REMOTE_THUMBNAIL, key), []):
                _apply(f, row, original=False)
        for thumb in await db.store_remote_thumbnails():
            if f"{thumb.server_name}/{thumb.filesystem_id}" in remote_keys:
                _set_thumbnail_length(by_rel, thumb)


def _set_thumbnail_length(by_rel: dict[str, CachedFile], thumb: ThumbnailRow) -> None:
    for rel in _thumbnail_rels(thumb):
        f = by_rel.get(rel)
        if f is not None and f.kind != Kind.URL_PREVIEW:
            f.expected_size = thumb.length


async def inventory(root: str, db: Database) -> list[CachedFile]:
    """Walk the cache (in a thread), then annotate from the database."""
    files = await asyncio.to_thread(walk, root)
    await annotate(db, files)
    return files
