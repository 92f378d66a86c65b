"""Metadata.close while the flusher is writing access times: the write finishes, then the
database closes (once, a stop cut the write and closed SQLite under it: an error logged
with a traceback, "Task exception was never retrieved", and the batch lost)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
from pathlib import Path
from typing import Any

from media_proxy.metadata import Metadata, SqliteDatabase


async def test_close_waits_for_the_flush_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "homeserver.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE local_media_repository (media_id TEXT, last_access_ts BIGINT)")
        conn.executemany(
            "INSERT INTO local_media_repository VALUES (?, NULL)", [(f"m{i}",) for i in range(50)]
        )
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    meta = Metadata(await SqliteDatabase.open(str(path)), ttl=60, maxsize=100, flush_interval=0.001)
    await meta.start()
    for i in range(50):
        meta.mark_accessed(f"m{i}")
    while meta._accessed:  # noqa: ASYNC110 (until the flusher took the batch: loop turns)
        await asyncio.sleep(0)
    await meta.close()
    gc.collect()
    await asyncio.sleep(0)
    assert unhandled == []
    with sqlite3.connect(path) as conn:
        written = conn.execute(
            "SELECT count(*) FROM local_media_repository WHERE last_access_ts IS NOT NULL"
        ).fetchone()[0]
    assert written == 50
