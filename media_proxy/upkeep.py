"""The `media-proxy cache status|upload|evict` commands: open the parts, run, print a summary."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import random
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from media_proxy.config import Config
from media_proxy.evict import Evictor, Rules
from media_proxy.inventory import IN_S3, CachedFile, Kind, ListingJoin, chunks
from media_proxy.metadata import Database, DatabaseError, open_database
from media_proxy.progress import Progress, Summary, human
from media_proxy.s3 import S3, S3Error
from media_proxy.upload import Uploader

Out = Callable[[str], None]


class UsageError(Exception):
    """Bad input the user can fix: printed as one line, exit status 2."""


@dataclass
class Parts:
    db: Database
    s3: S3 | None
    root: str


@asynccontextmanager
async def _parts(config: Config, *, need_s3: bool) -> AsyncIterator[Parts]:
    if need_s3 and config.s3 is None:
        raise UsageError(
            "no s3_storage_provider.S3StorageProviderBackend in the Synapse config (or s3: key)"
        )
    if not config.cache_path.is_dir():
        raise UsageError(f"cache_path {config.cache_path} is not a directory")
    db = await open_database(config.database)
    s3 = S3(config.s3) if config.s3 is not None else None
    try:
        if s3 is not None:
            await s3.start()
        yield Parts(db, s3, str(config.cache_path))
    finally:
        if s3 is not None:
            await s3.close()
        await db.close()


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Coverage:
    """How much of the store S3 holds. Full: each file's size from the listing merged with the
    walk (ListObjectsV2, no HeadObject). Sampled: a reservoir of `sample` files (memory
    bounded by the sample), each then asked with HeadObject."""

    def __init__(self, s3: S3, sample: int | None, root: str) -> None:
        self.s3, self.sample = s3, sample
        self.listing = ListingJoin(s3, root)
        self.counts = {"held": 0, "held_bytes": 0, "missing": 0, "other_size": 0, "errors": 0}
        self.checked_files = self.checked_bytes = self.eligible_files = self.eligible_bytes = 0
        self.reservoir: list[CachedFile] = []

    def _count(self, f: CachedFile, size: int | None) -> None:
        self.checked_files += 1
        self.checked_bytes += f.size
        if size is None:
            self.counts["missing"] += 1
        elif size != f.size:
            self.counts["other_size"] += 1
        else:
            self.counts["held"] += 1
            self.counts["held_bytes"] += f.size

    async def add(self, f: CachedFile) -> None:
        """Called for each file, in the walk's order."""
        if f.kind not in IN_S3:
            return
        self.eligible_files += 1
        self.eligible_bytes += f.size
        if self.sample is None:
            self._count(f, await self.listing.size(f.rel))
        elif len(self.reservoir) < self.sample:
            self.reservoir.append(f)
        elif (j := random.randrange(self.eligible_files)) < self.sample:
            self.reservoir[j] = f

    async def result(self, concurrency: int) -> dict[str, Any]:
        await self.listing.close()
        sem = asyncio.Semaphore(concurrency)

        async def head(f: CachedFile) -> None:
            async with sem:
                try:
                    size = await self.s3.size(f.rel)
                except S3Error:
                    self.counts["errors"] += 1
                    return
            self._count(f, size)

        await asyncio.gather(*(head(f) for f in self.reservoir))
        share = self.counts["held_bytes"] / self.checked_bytes if self.checked_bytes else 1.0
        sampled = self.sample is not None
        return {
            "method": f"sample of {len(self.reservoir)} files" if sampled else "full",
            "source": "HeadObject" if sampled else "ListObjectsV2",
            "list_requests": self.listing.pages,
            "checked_files": self.checked_files + (self.counts["errors"] if sampled else 0),
            "checked_bytes": self.checked_bytes,
            **self.counts,
            "held_share_by_bytes": round(share, 4),
            "estimated_held_bytes": round(share * self.eligible_bytes)
            if sampled
            else self.counts["held_bytes"],
        }


async def status(
    config: Config, *, sample: int | None, concurrency: int = 32, check_s3: bool = True
) -> dict[str, Any]:
    """The store by kind, recency and S3 coverage, from one streamed walk: memory and
    database work per chunk, S3 requests per 1,000 keys listed."""
    async with _parts(config, need_s3=False) as parts:
        kinds: dict[str, dict[str, int]] = {k.value: {"files": 0, "bytes": 0} for k in Kind}
        files = total = 0
        oldest: float | None = None
        newest: float | None = None
        coverage = None
        if check_s3 and parts.s3 is not None:
            coverage = _Coverage(parts.s3, sample, parts.root)
        progress = Progress("cache_status", 0, 0)
        try:
            async for chunk in chunks(parts.root, parts.db):
                progress.total_files += len(chunk)
                for f in chunk:
                    kinds[f.kind.value]["files"] += 1
                    kinds[f.kind.value]["bytes"] += f.size
                    files += 1
                    total += f.size
                    access = f.last_access
                    oldest = access if oldest is None else min(oldest, access)
                    newest = access if newest is None else max(newest, access)
                    if coverage is not None:
                        await coverage.add(f)
                    progress.advance(1, f.size)
        finally:
            progress.close()
        st = os.statvfs(parts.root)
        result: dict[str, Any] = {
            "cache_path": parts.root,
            "files": files,
            "bytes": total,
            "kinds": kinds,
            "budget_bytes": config.cache_max_size,
            "over_budget_bytes": max(0, total - config.cache_max_size)
            if config.cache_max_size is not None
            else None,
            "disk_free_bytes": st.f_bavail * st.f_frsize,
            "oldest_access": _iso(oldest),
            "newest_access": _iso(newest),
            "recency_rule": "last_access_ts, else created_ts, of the media row; "
            "files without a row: the later of mtime and atime",
            "s3": None,
        }
        if coverage is not None:
            result["s3"] = await coverage.result(concurrency)
        return result


def _print_status(s: dict[str, Any], out: Out) -> None:
    budget = s["budget_bytes"]
    used = f", {100 * s['bytes'] / budget:.0f}% of it used" if budget else ""
    out(
        f"cache {s['cache_path']}: {s['files']} files, {human(s['bytes'])}; budget "
        f"{human(budget) if budget is not None else 'none (cache_max_size unset)'}{used};"
        f" {human(s['disk_free_bytes'])} free on disk"
    )
    out(f"  {'kind':20} {'files':>10} {'size':>12}")
    for kind, v in s["kinds"].items():
        out(f"  {kind:20} {v['files']:>10} {human(v['bytes']):>12}")
    out(f"  oldest access {s['oldest_access']}, newest access {s['newest_access']}")
    c = s["s3"]
    if c is None:
        out("  S3: not checked")
        return
    out(
        f"  S3 ({c['method']}): holds {c['held']} of {c['checked_files']} checked files,"
        f" {100 * c['held_share_by_bytes']:.1f}% by bytes; missing {c['missing']},"
        f" other size {c['other_size']}, errors {c['errors']}"
    )
    if c["method"] != "full":
        out(f"  S3 holds an estimated {human(c['estimated_held_bytes'])} of the cache")


def _print_summary(summary: Summary, as_json: bool, out: Out) -> None:
    if as_json:
        out(json.dumps(summary.as_dict(), sort_keys=True))
    else:
        for line in summary.lines():
            out(line)


async def run_status(
    config: Config, *, sample: int | None, as_json: bool, check_s3: bool, out: Out = print
) -> int:
    s = await status(config, sample=sample, check_s3=check_s3)
    if as_json:
        out(json.dumps(s, sort_keys=True))
    else:
        _print_status(s, out)
    return 0


async def run_upload(
    config: Config, *, concurrency: int, dry_run: bool, as_json: bool, out: Out = print
) -> int:
    async with _parts(config, need_s3=True) as parts:
        assert parts.s3 is not None
        summary = await Uploader(parts.s3, parts.root, concurrency, dry_run).run(
            chunks(parts.root, parts.db)
        )
    _print_summary(summary, as_json, out)
    failed = summary.skipped["s3_error"] + summary.skipped["unverified"]
    return 1 if failed else 0


async def run_evict(
    config: Config,
    *,
    max_size: int,
    rules: Rules,
    concurrency: int,
    as_json: bool,
    out: Out = print,
) -> int:
    async with _parts(config, need_s3=True) as parts:
        assert parts.s3 is not None
        root, db = parts.root, parts.db
        evictor = Evictor(parts.s3, root, rules, concurrency=concurrency)
        # The first round's walk measures the store: one walk, not a count and then a walk.
        summary = await evictor.run(lambda: chunks(root, db), None, max_size)
    _print_summary(summary, as_json, out)
    return 0


def run(coro: Any) -> int:
    """Run a command coroutine; database/S3/usage problems become one line on stderr."""
    try:
        code: int = asyncio.run(coro)
        return code
    except UsageError as e:
        print(f"media-proxy: {e}", file=sys.stderr)
        return 2
    except (DatabaseError, S3Error) as e:
        print(f"media-proxy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("media-proxy: interrupted; run the command again to continue", file=sys.stderr)
        return 130
