"""`media-proxy check`: try each part for real and say, one line each, what works."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable

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
    config.cache_path.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=config.cache_path, prefix=".media-proxy-check-"):
        pass
    st = os.statvfs(config.cache_path)
    free = st.f_bavail * st.f_frsize / 1024**3
    return f"{config.cache_path} writable, {free:.1f} GiB free"


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
