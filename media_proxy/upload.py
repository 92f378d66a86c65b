"""`media-proxy cache upload`: copy to S3 every cached file it lacks or holds with another size.

It replaces `s3_media_upload upload` without a state file: each run streams the store in key
order and merges it with S3's listing (ListObjectsV2, 1,000 keys a request; no HeadObject per
file), so it is resumable by running it again, in bounded memory. Keys, storage class and
SSE-C are the provider's. It never deletes anything, and never uploads a file it cannot vouch for:
- URL-preview files (the provider never stores them) and files outside Synapse's layout;
- files without a database row (deleted media, or a write Synapse has not finished: Synapse
  records an upload's length, a download's row and a thumbnail's row only after the file is
  complete), and files whose size differs from the row's length (a truncated in-place write
  must never replace a good S3 copy);
- originals whose sha256 differs from the database's (checked for files up to
  `verify_sha256_max`, since it means reading the file once more).
Each upload is verified afterwards with HeadObject (size); an object only appears in S3 once
complete, and a failed multipart upload is aborted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import structlog

from media_proxy import paths
from media_proxy.inventory import IN_S3, CachedFile, ListingJoin
from media_proxy.progress import Progress, Summary
from media_proxy.s3 import S3, S3Error

log = structlog.get_logger("media_proxy.cache")

DEFAULT_VERIFY_SHA256_MAX: Final = 4 * 1024 * 1024
_HASH_CHUNK: Final = 1024 * 1024


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def unchanged(path: str, f: CachedFile) -> bool:
    """The file is still the one the inventory saw (same inode, size and mtime)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_size, st.st_mtime_ns) == (f.ino, f.size, f.mtime_ns)


async def refuse_reason(root: str, f: CachedFile, *, verify_sha256_max: int) -> str | None:
    """Why this file must not be uploaded, or None."""
    if f.kind not in IN_S3:
        return "not_stored_in_s3"  # URL previews, files outside the layout
    if f.expected_size is None:
        return "no_db_row"
    if f.size != f.expected_size:
        return "size_differs_from_db"
    if f.sha256 and f.size <= verify_sha256_max:
        digest = await asyncio.to_thread(_sha256_of, paths.in_store(root, f.rel))
        if digest != f.sha256:
            return "sha256_differs_from_db"
    return None


async def put_verified(s3: S3, root: str, f: CachedFile) -> str | None:
    """Upload `f` and check S3 holds it with its size; None on success, else why not."""
    path = paths.in_store(root, f.rel)
    if not unchanged(path, f):
        return "changed"
    try:
        await s3.put_file(f.rel, path)
        size = await s3.size(f.rel)
    except FileNotFoundError:
        return "changed"
    except S3Error as e:
        log.warning("cache_upload.failed", rel=f.rel, error=str(e))
        return "s3_error"
    if size != f.size or not unchanged(path, f):
        log.warning("cache_upload.unverified", rel=f.rel, local=f.size, s3=size)
        return "unverified"
    return None


@dataclass
class Uploader:
    s3: S3
    root: str
    concurrency: int = 8
    dry_run: bool = False
    verify_sha256_max: int = DEFAULT_VERIFY_SHA256_MAX

    async def run(self, batches: AsyncIterator[list[CachedFile]]) -> Summary:
        """Upload what the listing lacks, chunk by chunk of the streamed walk (inventory.chunks,
        which comes in key order, as ListingJoin needs)."""
        summary = Summary("would upload" if self.dry_run else "uploaded")
        started = time.monotonic()
        progress = Progress("cache_upload", 0, 0)
        listing = ListingJoin(self.s3, self.root)
        sem = asyncio.Semaphore(max(1, self.concurrency))

        async def one(f: CachedFile, s3_size: int | None) -> None:
            async with sem:
                reason = await self.one(f, s3_size)
            if reason is None:
                summary.done(f.size)
            else:
                summary.skip(reason, f.size)
            progress.advance(1, f.size)

        try:
            async for chunk in batches:
                progress.total_files += len(chunk)
                progress.total_bytes += sum(f.size for f in chunk)
                work = []
                for f in chunk:
                    # A listing that fails stops the run (S3Error: one line, exit 1).
                    s3_size = await listing.size(f.rel) if f.kind in IN_S3 else None
                    work.append(one(f, s3_size))
                await asyncio.gather(*work)
        finally:
            await listing.close()
            progress.close()
        summary.extra["list_requests"] = listing.pages
        summary.seconds = time.monotonic() - started
        return summary

    async def one(self, f: CachedFile, s3_size: int | None) -> str | None:
        """Upload `f` unless S3 (per its listing) already holds its size, or it is refused
        (checked second: the sha256 check reads the file, which only an upload needs)."""
        if s3_size == f.size and f.kind in IN_S3:
            return "already_in_s3"
        reason = await refuse_reason(self.root, f, verify_sha256_max=self.verify_sha256_max)
        if reason is not None:
            return reason
        if self.dry_run:
            print(f"would upload {f.rel} {f.size} (S3 holds {s3_size})", flush=True)
            return None
        reason = await put_verified(self.s3, self.root, f)
        if reason is None:
            log.info("cache_upload.done", rel=f.rel, bytes=f.size, replaced=s3_size)
        return reason
