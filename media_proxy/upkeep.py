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
from media_proxy.inventory import IN_S3, CachedFile, Kind, inventory
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


async def _s3_coverage(
    s3: S3, files: list[CachedFile], sample: int | None, concurrency: int
) -> dict[str, Any]:
    """HeadObject on every S3-kind file (or a random sample): how much S3 holds."""
    eligible = [f for f in files if f.kind in IN_S3]
    checked = eligible if sample is None else random.sample(eligible, min(sample, len(eligible)))
    counts = {"held": 0, "held_bytes": 0, "missing": 0, "other_size": 0, "errors": 0}
    progress = Progress("cache_status", len(checked), sum(f.size for f in checked))
    sem = asyncio.Semaphore(concurrency)

    async def one(f: CachedFile) -> None:
        async with sem:
            try:
                size = await s3.size(f.rel)
            except S3Error:
                counts["errors"] += 1
                return
            finally:
                progress.advance(1, f.size)
        if size is None:
            counts["missing"] += 1
        elif size != f.size:
            counts["other_size"] += 1
        else:
            counts["held"] += 1
            counts["held_bytes"] += f.size

    try:
        await asyncio.gather(*(one(f) for f in checked))
    finally:
        progress.close()
    checked_bytes = sum(f.size for f in checked)
    eligible_bytes = sum(f.size for f in eligible)
    share = counts["held_bytes"] / checked_bytes if checked_bytes else 1.0
    return {
        "method": "full" if sample is None else f"sample of {len(checked)} files",
        "checked_files": len(checked),
        "checked_bytes": checked_bytes,
        **counts,
        "held_share_by_bytes": round(share, 4),
        "estimated_held_bytes": round(share * eligible_bytes)
        if sample is not None
        else counts["held_bytes"],
    }


async def status(
    config: Config, *, sample: int | None, concurrency: int = 32, check_s3: bool = True
) -> dict[str, Any]:
    async with _parts(config, need_s3=False) as parts:
        files = await inventory(parts.root, parts.db)
        kinds: dict[str, dict[str, int]] = {k.value: {"files": 0, "bytes": 0} for k in Kind}
        for f in files:
            kinds[f.kind.value]["files"] += 1
            kinds[f.kind.value]["bytes"] += f.size
        total = sum(f.size for f in files)
        accesses = [f.last_access for f in files]
        st = os.statvfs(parts.root)
        result: dict[str, Any] = {
            "cache_path": parts.root,
            "files": len(files),
            "bytes": total,
            "kinds": kinds,
            "budget_bytes": config.cache_max_size,
            "over_budget_bytes": max(0, total - config.cache_max_size)
            if config.cache_max_size is not None
            else None,
            "disk_free_bytes": st.f_bavail * st.f_frsize,
            "oldest_access": _iso(min(accesses) if accesses else None),
            "newest_access": _iso(max(accesses) if accesses else None),
            "recency_rule": "last_access_ts, else created_ts, of the media row; "
            "files without a row: the later of mtime and atime",
            "s3": None,
        }
        if check_s3 and parts.s3 is not None:
            result["s3"] = await _s3_coverage(parts.s3, files, sample, concurrency)
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
        files = await inventory(parts.root, parts.db)
        summary = await Uploader(parts.s3, parts.root, concurrency, dry_run).run(files)
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
        files = await inventory(parts.root, parts.db)
        evictor = Evictor(parts.s3, parts.root, rules, concurrency=concurrency)
        summary = await evictor.run(files, max_size)
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
