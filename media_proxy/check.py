"""`media-proxy check`: try each part for real and say, one line each, what works.

A check changes nothing: a missing database file or cache folder is reported as missing,
never created (SQLite would create an empty database; serve creates the cache folder).
"""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import yaml

from media_proxy.config import Config, masked
from media_proxy.metadata import DatabaseError, open_database
from media_proxy.s3 import S3, S3Error


async def _database(config: Config) -> str:
    db = await open_database(config.database)
    try:
        await db.local_media("media-proxy-check")
        writable = await db.can_write()
    finally:
        await db.close()
    access = "last_access_ts writable" if writable else "READ-ONLY: last_access_ts not updated"
    return f"{config.database.engine} readable, {access}"


async def _s3(config: Config) -> str:
    if config.s3 is None:
        raise S3Error("no s3_storage_provider.S3StorageProviderBackend in homeserver.yaml")
    s3 = S3(config.s3)
    await s3.start()
    try:
        await s3.check_bucket()
    finally:
        await s3.close()
    where = config.s3.endpoint_url or "AWS"
    return f"bucket {config.s3.bucket!r} at {where} answers (prefix {config.s3.prefix!r})"


async def _cache(config: Config) -> str:
    return await asyncio.to_thread(_cache_folder, config.cache_path)


def _cache_folder(path: Path) -> str:
    """Whether serve can write its fills into `path`, asked without writing anything."""
    if not path.exists():
        raise RuntimeError(f"{path} does not exist")
    if not path.is_dir():
        raise RuntimeError(f"{path} is not a directory")
    fs = os.statvfs(path)
    if fs.f_flag & os.ST_RDONLY:
        raise RuntimeError(f"{path} is on a read-only filesystem")
    if not os.access(path, os.W_OK | os.X_OK):
        raise RuntimeError(f"{path} is not writable by {_user(os.geteuid())}")
    free = fs.f_bavail * fs.f_frsize / 1024**3
    owner = path.stat().st_uid
    # root may write anywhere: say so, the proxy should run as the folder's owner
    as_root = os.geteuid() == 0 and owner != 0
    note = f" (checked as root; it belongs to {_user(owner)})" if as_root else ""
    return f"{path} writable, {free:.1f} GiB free{note}"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


async def _synapse(config: Config) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(config.synapse_url + "/_matrix/client/versions") as resp,
    ):
        if resp.status != 200:
            raise RuntimeError(f"/_matrix/client/versions answered {resp.status}")
        server = resp.headers.get("Server", "unknown server")
    return f"{config.synapse_url} answers ({server})"


async def run(config: Config, out: Callable[[str], None] = print) -> int:
    out("# effective configuration")
    out(yaml.safe_dump(masked(config), sort_keys=False).rstrip())
    out("# checks")
    checks: list[tuple[str, Callable[[Config], Awaitable[str]]]] = [
        ("homeserver.yaml", _parsed),
        ("database", _database),
        ("s3", _s3),
        ("cache", _cache),
        ("synapse", _synapse),
    ]
    failed = 0
    for name, check in checks:
        try:
            detail = await asyncio.wait_for(check(config), timeout=20)
            out(f"ok    {name}: {detail}")
        except (DatabaseError, S3Error, OSError, RuntimeError, aiohttp.ClientError) as e:
            failed += 1
            out(f"FAIL  {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        except TimeoutError:
            failed += 1
            out(f"FAIL  {name}: no answer within 20 s")
    return 1 if failed else 0


async def _parsed(config: Config) -> str:
    return f"server_name {config.server_name!r}, media store {config.media_store_path}"
