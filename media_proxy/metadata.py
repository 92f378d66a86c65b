"""Media rows from Synapse's database, cached briefly, and the batched access-time writes.

The database, not S3 or the disk, says whether media exists, is quarantined or is
authenticated, so every served file starts here. Rows are kept in a small TTL cache (the TTL
bounds how long a quarantine or deletion takes to reach the proxy) and `last_access_ts` is
written back in one batch per interval, as Synapse does, so retention and eviction see what
the proxy served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import aiosqlite
import asyncpg
import cachetools
import structlog

from media_proxy import metrics
from media_proxy.config import DatabaseConfig
from media_proxy.federation_auth import KeyRow
from media_proxy.inflight import Inflight

T = TypeVar("T")


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Mark a given-up query's outcome as seen (no "exception never retrieved" noise)."""
    if not task.cancelled():
        task.exception()


log = structlog.get_logger(__name__)

_LOCAL_COLUMNS: Final = (
    "media_type, media_length, upload_name, created_ts, quarantined_by, url_cache,"
    " authenticated, sha256"
)
# SQLite's busy timeout: our only writes are the batched access times, and Synapse must
# never see a lock held long by us, so we wait for it rather than the other way round.
SQLITE_BUSY_TIMEOUT_S: Final = 5.0


class DatabaseError(Exception):
    """The database could not answer; the caller passes the request to Synapse."""


@dataclass(frozen=True, slots=True)
class LocalMedia:
    media_id: str
    media_type: str | None
    media_length: int | None  # None: created with /create, not uploaded yet
    upload_name: str | None
    created_ts: int
    quarantined_by: str | None
    url_cache: str | None
    authenticated: bool
    sha256: str | None


def _local_from_row(media_id: str, row: Any) -> LocalMedia:
    return LocalMedia(
        media_id=media_id,
        media_type=row[0],
        media_length=row[1],
        upload_name=row[2],
        created_ts=row[3],
        quarantined_by=row[4],
        url_cache=row[5],
        authenticated=bool(row[6]),
        sha256=row[7],
    )


@dataclass(frozen=True, slots=True)
class RemoteMedia:
    """A `remote_media_cache` row: media Synapse fetched from `origin` and keeps under
    `filesystem_id` (chosen locally; the origin's media id never forms a path)."""

    origin: str
    media_id: str
    media_type: str | None
    media_length: int | None
    upload_name: str | None
    filesystem_id: str
    quarantined_by: str | None
    authenticated: bool
    sha256: str | None


_REMOTE_COLUMNS: Final = (
    "media_type, media_length, upload_name, filesystem_id, quarantined_by, authenticated, sha256"
)
_REMOTE_MEDIA: Final = (
    f"SELECT {_REMOTE_COLUMNS} FROM remote_media_cache"
    " WHERE media_origin = {} AND media_id = {}"
)


def _remote_from_row(origin: str, media_id: str, row: Any) -> RemoteMedia:
    return RemoteMedia(
        origin=origin,
        media_id=media_id,
        media_type=row[0],
        media_length=row[1],
        upload_name=row[2],
        filesystem_id=row[3],
        quarantined_by=row[4],
        authenticated=bool(row[5]),
        sha256=row[6],
    )


@dataclass(frozen=True, slots=True)
class StoreRow:
    """What the cache's upkeep (inventory, eviction, upload) needs from one media row."""

    media_length: int | None
    created_ts: int | None
    last_access_ts: int | None
    url_cache: bool
    sha256: str | None


@dataclass(frozen=True, slots=True)
class ThumbnailRow:
    """One thumbnail row; `server_name`/`filesystem_id` are empty for local media."""

    media_id: str
    server_name: str
    filesystem_id: str
    width: int
    height: int
    content_type: str
    method: str
    length: int | None


# Synapse's own query (no ORDER BY): same query, same row order as Synapse sees.
_LOCAL_THUMBNAILS: Final = (
    "SELECT thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method,"
    " thumbnail_length FROM local_media_repository_thumbnails WHERE media_id = {}"
)

# Synapse's remote query (no ORDER BY either). Its rows' own filesystem_id is not used for
# paths: Synapse builds them from the media row's (`respond_remote_thumbnail`).
_REMOTE_THUMBNAILS: Final = (
    "SELECT thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method,"
    " thumbnail_length FROM remote_media_cache_thumbnails"
    " WHERE media_origin = {} AND media_id = {}"
)
# Other servers' keys as Synapse's keyring reads them (`KeyStore.get_server_keys_json`);
# `federation_auth.usable_key` picks the row Synapse would (the newest by ts_added_ms).
_SERVER_KEYS: Final = (
    "SELECT key_json, ts_added_ms, ts_valid_until_ms FROM server_keys_json"
    " WHERE server_name = {} AND key_id = {}"
)
_TOUCH_REMOTE: Final = (
    "UPDATE remote_media_cache SET last_access_ts = {} WHERE media_origin = {} AND media_id = {}"
)

# Bulk reads for the cache's upkeep: local rows by their (indexed) media_id, in batches;
# remote rows are keyed on disk by filesystem_id, which has no index, so one scan.
_BATCH: Final = 500
_STORE_LOCAL: Final = (
    "SELECT media_id, media_length, created_ts, last_access_ts, url_cache, sha256"
    " FROM local_media_repository WHERE media_id IN ({})"
)
_STORE_LOCAL_THUMBNAILS: Final = (
    "SELECT media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method,"
    " thumbnail_length FROM local_media_repository_thumbnails WHERE media_id IN ({})"
)
_STORE_REMOTE: Final = (
    "SELECT media_origin, filesystem_id, media_length, created_ts, last_access_ts, sha256"
    " FROM remote_media_cache"
)
_STORE_REMOTE_THUMBNAILS: Final = (
    "SELECT t.media_origin, r.filesystem_id, t.thumbnail_width, t.thumbnail_height,"
    " t.thumbnail_type, t.thumbnail_method, t.thumbnail_length"
    " FROM remote_media_cache_thumbnails AS t JOIN remote_media_cache AS r"
    " ON r.media_origin = t.media_origin AND r.media_id = t.media_id"
)
# Remote rows of the files of one chunk of the store walk. The unique index
# (media_origin, media_id) narrows the scan to the origin's rows; Synapse has no index on
# filesystem_id. Thumbnails then by (media_origin, media_id): that index's full key.
_STORE_REMOTE_OF: Final = (
    "SELECT filesystem_id, media_id, media_length, created_ts, last_access_ts, sha256"
    " FROM remote_media_cache WHERE media_origin = {} AND filesystem_id IN ({})"
)
_STORE_REMOTE_THUMBNAILS_OF: Final = (
    "SELECT media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method,"
    " thumbnail_length FROM remote_media_cache_thumbnails"
    " WHERE media_origin = {} AND media_id IN ({})"
)


def _store_row(row: Any) -> StoreRow:
    return StoreRow(
        media_length=row[0],
        created_ts=row[1],
        last_access_ts=row[2],
        url_cache=row[3] is not None,
        sha256=row[4],
    )


def _thumbnail_row(media_id: str, server: str, fid: str, row: Any) -> ThumbnailRow:
    return ThumbnailRow(media_id, server, fid, int(row[0]), int(row[1]), row[2], row[3], row[4])


class Database(Protocol):
    async def local_media(self, media_id: str) -> LocalMedia | None: ...
    async def local_thumbnails(self, media_id: str) -> list[ThumbnailRow]: ...
    async def touch_local(self, media_ids: list[str], now_ms: int) -> None: ...
    async def remote_media(self, origin: str, media_id: str) -> RemoteMedia | None: ...
    async def remote_thumbnails(self, origin: str, media_id: str) -> list[ThumbnailRow]: ...
    async def touch_remote(self, keys: list[tuple[str, str]], now_ms: int) -> None: ...
    async def server_keys(self, server_name: str, key_id: str) -> list[KeyRow]: ...
    async def can_write(self) -> bool: ...
    async def store_local_rows(self, media_ids: Sequence[str]) -> dict[str, StoreRow]: ...
    async def store_local_thumbnails(self, media_ids: Sequence[str]) -> list[ThumbnailRow]: ...
    async def store_remote_rows(self) -> dict[tuple[str, str], StoreRow]: ...
    async def store_remote_thumbnails(self) -> list[ThumbnailRow]: ...
    async def store_remote_rows_of(
        self, origin: str, fids: Sequence[str]
    ) -> dict[str, tuple[str, StoreRow]]: ...
    async def store_remote_thumbnails_of(
        self, origin: str, media_ids: Sequence[str]
    ) -> list[ThumbnailRow]: ...
    async def close(self) -> None: ...


class SqliteDatabase:
    """Synapse's SQLite file, shared with Synapse (which keeps it in WAL mode)."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    async def open(cls, path: str) -> SqliteDatabase:
        # mode=rw: a wrong path is an error, never a new empty database beside Synapse's
        uri = f"file:{urllib.parse.quote(path)}?mode=rw"
        conn = await aiosqlite.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S)
        await conn.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        return cls(conn)

    async def local_media(self, media_id: str) -> LocalMedia | None:
        try:
            async with self._conn.execute(
                f"SELECT {_LOCAL_COLUMNS} FROM local_media_repository WHERE media_id = ?",
                (media_id,),
            ) as cursor:
                row = await cursor.fetchone()
        except sqlite3.Error as e:
            raise DatabaseError(str(e)) from e
        return None if row is None else _local_from_row(media_id, row)

    async def touch_local(self, media_ids: list[str], now_ms: int) -> None:
        try:
            await self._conn.executemany(
                "UPDATE local_media_repository SET last_access_ts = ? WHERE media_id = ?",
                [(now_ms, m) for m in media_ids],
            )
            await self._conn.commit()
        except sqlite3.Error as e:
            await self._conn.rollback()
            raise DatabaseError(str(e)) from e

    async def remote_media(self, origin: str, media_id: str) -> RemoteMedia | None:
        rows = await self._all(_REMOTE_MEDIA.format("?", "?"), (origin, media_id))
        return _remote_from_row(origin, media_id, rows[0]) if rows else None

    async def remote_thumbnails(self, origin: str, media_id: str) -> list[ThumbnailRow]:
        rows = await self._all(_REMOTE_THUMBNAILS.format("?", "?"), (origin, media_id))
        return [_thumbnail_row(media_id, origin, "", r) for r in rows]

    async def server_keys(self, server_name: str, key_id: str) -> list[KeyRow]:
        rows = await self._all(_SERVER_KEYS.format("?", "?"), (server_name, key_id))
        return [KeyRow(bytes(r[0]), int(r[1]), r[2]) for r in rows]

    async def touch_remote(self, keys: list[tuple[str, str]], now_ms: int) -> None:
        try:
            await self._conn.executemany(
                _TOUCH_REMOTE.format("?", "?", "?"), [(now_ms, o, m) for o, m in keys]
            )
            await self._conn.commit()
        except sqlite3.Error as e:
            await self._conn.rollback()
            raise DatabaseError(str(e)) from e

    async def can_write(self) -> bool:
        try:
            await self._conn.execute("BEGIN IMMEDIATE")
            await self._conn.rollback()
            return True
        except sqlite3.Error:
            return False

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            async with self._conn.execute(sql, tuple(args)) as cursor:
                return list(await cursor.fetchall())
        except sqlite3.Error as e:
            raise DatabaseError(str(e)) from e

    async def _batched(self, template: str, ids: Sequence[str]) -> list[Any]:
        rows: list[Any] = []
        for i in range(0, len(ids), _BATCH):
            batch = ids[i : i + _BATCH]
            rows += await self._all(template.format(",".join("?" * len(batch))), batch)
        return rows

    async def store_local_rows(self, media_ids: Sequence[str]) -> dict[str, StoreRow]:
        rows = await self._batched(_STORE_LOCAL, media_ids)
        return {r[0]: _store_row(r[1:]) for r in rows}

    async def store_local_thumbnails(self, media_ids: Sequence[str]) -> list[ThumbnailRow]:
        rows = await self._batched(_STORE_LOCAL_THUMBNAILS, media_ids)
        return [_thumbnail_row(r[0], "", "", r[1:]) for r in rows]

    async def local_thumbnails(self, media_id: str) -> list[ThumbnailRow]:
        rows = await self._all(_LOCAL_THUMBNAILS.format("?"), (media_id,))
        return [_thumbnail_row(media_id, "", "", r) for r in rows]

    async def store_remote_rows(self) -> dict[tuple[str, str], StoreRow]:
        rows = await self._all(_STORE_REMOTE)
        return {(r[0], r[1]): _store_row((r[2], r[3], r[4], None, r[5])) for r in rows}

    async def store_remote_thumbnails(self) -> list[ThumbnailRow]:
        rows = await self._all(_STORE_REMOTE_THUMBNAILS)
        return [_thumbnail_row("", r[0], r[1], r[2:]) for r in rows]

    async def _of_origin(self, template: str, origin: str, ids: Sequence[str]) -> list[Any]:
        rows: list[Any] = []
        for i in range(0, len(ids), _BATCH):
            batch = list(ids[i : i + _BATCH])
            sql = template.format("?", ",".join("?" * len(batch)))
            rows += await self._all(sql, [origin, *batch])
        return rows

    async def store_remote_rows_of(
        self, origin: str, fids: Sequence[str]
    ) -> dict[str, tuple[str, StoreRow]]:
        """{filesystem_id: (media_id, row)} of one origin's media stored under `fids`."""
        rows = await self._of_origin(_STORE_REMOTE_OF, origin, fids)
        return {r[0]: (r[1], _store_row((r[2], r[3], r[4], None, r[5]))) for r in rows}

    async def store_remote_thumbnails_of(
        self, origin: str, media_ids: Sequence[str]
    ) -> list[ThumbnailRow]:
        rows = await self._of_origin(_STORE_REMOTE_THUMBNAILS_OF, origin, media_ids)
        return [_thumbnail_row(r[0], origin, "", r[1:]) for r in rows]

    async def close(self) -> None:
        await self._conn.close()


class PostgresDatabase:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, args: dict[str, Any]) -> PostgresDatabase:
        pool = await asyncpg.create_pool(
            min_size=1, max_size=8, command_timeout=10, **_asyncpg_args(args)
        )
        return cls(pool)

    async def local_media(self, media_id: str) -> LocalMedia | None:
        try:
            row = await self._pool.fetchrow(
                f"SELECT {_LOCAL_COLUMNS} FROM local_media_repository WHERE media_id = $1",
                media_id,
            )
        except (TimeoutError, asyncpg.PostgresError, OSError) as e:
            raise DatabaseError(str(e)) from e
        return None if row is None else _local_from_row(media_id, row)

    async def touch_local(self, media_ids: list[str], now_ms: int) -> None:
        try:
            await self._pool.executemany(
                "UPDATE local_media_repository SET last_access_ts = $1 WHERE media_id = $2",
                [(now_ms, m) for m in media_ids],
            )
        except (TimeoutError, asyncpg.PostgresError, OSError) as e:
            raise DatabaseError(str(e)) from e

    async def remote_media(self, origin: str, media_id: str) -> RemoteMedia | None:
        rows = await self._all(_REMOTE_MEDIA.format("$1", "$2"), origin, media_id)
        return _remote_from_row(origin, media_id, tuple(rows[0])) if rows else None

    async def remote_thumbnails(self, origin: str, media_id: str) -> list[ThumbnailRow]:
        rows = await self._all(_REMOTE_THUMBNAILS.format("$1", "$2"), origin, media_id)
        return [_thumbnail_row(media_id, origin, "", tuple(r)) for r in rows]

    async def server_keys(self, server_name: str, key_id: str) -> list[KeyRow]:
        rows = await self._all(_SERVER_KEYS.format("$1", "$2"), server_name, key_id)
        return [KeyRow(bytes(r[0]), int(r[1]), r[2]) for r in rows]

    async def touch_remote(self, keys: list[tuple[str, str]], now_ms: int) -> None:
        try:
            await self._pool.executemany(
                _TOUCH_REMOTE.format("$1", "$2", "$3"), [(now_ms, o, m) for o, m in keys]
            )
        except (TimeoutError, asyncpg.PostgresError, OSError) as e:
            raise DatabaseError(str(e)) from e

    async def can_write(self) -> bool:
        try:
            allowed = await self._pool.fetchval(
                "SELECT has_table_privilege('local_media_repository', 'UPDATE')"
            )
        except (asyncpg.PostgresError, OSError) as e:
            raise DatabaseError(str(e)) from e
        return bool(allowed)

    async def _all(self, sql: str, *args: Any) -> list[Any]:
        try:
            return list(await self._pool.fetch(sql, *args))
        except (TimeoutError, asyncpg.PostgresError, OSError) as e:
            raise DatabaseError(str(e)) from e

    async def _batched(self, template: str, ids: Sequence[str]) -> list[Any]:
        sql = template.replace("IN ({})", "= ANY($1::text[])")
        rows: list[Any] = []
        for i in range(0, len(ids), _BATCH * 10):
            rows += await self._all(sql, list(ids[i : i + _BATCH * 10]))
        return rows

    async def store_local_rows(self, media_ids: Sequence[str]) -> dict[str, StoreRow]:
        rows = await self._batched(_STORE_LOCAL, media_ids)
        return {r[0]: _store_row(tuple(r)[1:]) for r in rows}

    async def store_local_thumbnails(self, media_ids: Sequence[str]) -> list[ThumbnailRow]:
        rows = await self._batched(_STORE_LOCAL_THUMBNAILS, media_ids)
        return [_thumbnail_row(r[0], "", "", tuple(r)[1:]) for r in rows]

    async def local_thumbnails(self, media_id: str) -> list[ThumbnailRow]:
        rows = await self._all(_LOCAL_THUMBNAILS.format("$1"), media_id)
        return [_thumbnail_row(media_id, "", "", tuple(r)) for r in rows]

    async def store_remote_rows(self) -> dict[tuple[str, str], StoreRow]:
        rows = await self._all(_STORE_REMOTE)
        return {(r[0], r[1]): _store_row((r[2], r[3], r[4], None, r[5])) for r in rows}

    async def store_remote_thumbnails(self) -> list[ThumbnailRow]:
        rows = await self._all(_STORE_REMOTE_THUMBNAILS)
        return [_thumbnail_row("", r[0], r[1], tuple(r)[2:]) for r in rows]

    async def _of_origin(self, template: str, origin: str, ids: Sequence[str]) -> list[Any]:
        sql = template.replace("IN ({})", "= ANY($2::text[])").format("$1")
        rows: list[Any] = []
        for i in range(0, len(ids), _BATCH * 10):
            rows += await self._all(sql, origin, list(ids[i : i + _BATCH * 10]))
        return rows

    async def store_remote_rows_of(
        self, origin: str, fids: Sequence[str]
    ) -> dict[str, tuple[str, StoreRow]]:
        rows = await self._of_origin(_STORE_REMOTE_OF, origin, fids)
        return {r[0]: (r[1], _store_row((r[2], r[3], r[4], None, r[5]))) for r in rows}

    async def store_remote_thumbnails_of(
        self, origin: str, media_ids: Sequence[str]
    ) -> list[ThumbnailRow]:
        rows = await self._of_origin(_STORE_REMOTE_THUMBNAILS_OF, origin, media_ids)
        return [_thumbnail_row(r[0], origin, "", tuple(r)[1:]) for r in rows]

    async def close(self) -> None:
        await self._pool.close()


def _asyncpg_args(args: dict[str, Any]) -> dict[str, Any]:
    """psycopg2/libpq arguments (as in homeserver.yaml) to asyncpg's names."""
    out: dict[str, Any] = {}
    for key, value in args.items():
        if key == "dsn":
            out["dsn"] = value
        elif key in ("database", "dbname"):
            out["database"] = value
        elif key in ("user", "password", "host"):
            out[key] = value
        elif key == "port":
            out["port"] = int(value)
        elif key == "sslmode":
            out["ssl"] = value
    return out


async def open_database(config: DatabaseConfig) -> Database:
    try:
        if config.engine == "sqlite3":
            path = str(config.args["database"])
            if not await asyncio.to_thread(os.path.exists, path):
                raise DatabaseError(f"{path} does not exist")
            return await SqliteDatabase.open(path)
        return await PostgresDatabase.open(dict(config.args))
    except (OSError, sqlite3.Error, asyncpg.PostgresError) as e:
        raise DatabaseError(f"cannot open the {config.engine} database: {e}") from e


RemoteKey = tuple[str, str]  # (origin, media_id)


class Metadata:
    """Cached row lookups plus the access-time batch, over one `Database`."""

    def __init__(
        self,
        db: Database,
        *,
        ttl: float,
        maxsize: int,
        flush_interval: float,
        timeout: float = 5.0,
    ) -> None:
        self.db = db
        # A lookup that takes longer is undecidable: the request goes to Synapse.
        self._timeout = timeout
        # Access times are advisory: past this many pending, new ones are dropped, so a
        # database that is down for long cannot make the pending set grow without bound.
        self._max_pending = maxsize
        self._rows: cachetools.TTLCache[str, LocalMedia | None] = cachetools.TTLCache(
            maxsize=maxsize, ttl=ttl
        )
        self._inflight: Inflight[LocalMedia | None] = Inflight()
        self._thumbnails: cachetools.TTLCache[str, list[ThumbnailRow]] = cachetools.TTLCache(
            maxsize=maxsize, ttl=ttl
        )
        self._inflight_thumbnails: Inflight[list[ThumbnailRow]] = Inflight()
        self._remote: cachetools.TTLCache[RemoteKey, RemoteMedia | None] = cachetools.TTLCache(
            maxsize=maxsize, ttl=ttl
        )
        self._inflight_remote: Inflight[RemoteMedia | None] = Inflight()
        self._remote_thumbnails: cachetools.TTLCache[RemoteKey, list[ThumbnailRow]] = (
            cachetools.TTLCache(maxsize=maxsize, ttl=ttl)
        )
        self._inflight_remote_thumbnails: Inflight[list[ThumbnailRow]] = Inflight()
        # Keys change rarely (a new row per fetch); a fresher one reaches us within the TTL.
        self._keys: cachetools.TTLCache[RemoteKey, list[KeyRow]] = cachetools.TTLCache(
            maxsize=maxsize, ttl=ttl
        )
        self._inflight_keys: Inflight[list[KeyRow]] = Inflight()
        self._accessed: set[str] = set()
        self._accessed_remote: set[RemoteKey] = set()
        self._flush_interval = flush_interval
        self._writable = True
        self._flusher: asyncio.Task[None] | None = None
        self._flushing: asyncio.Future[None] | None = None  # the flusher's write, if any

    async def start(self) -> None:
        try:
            self._writable = await self.db.can_write()
        except DatabaseError:
            self._writable = False
        if not self._writable:
            log.warning(
                "database.read_only",
                detail="last_access_ts cannot be written; media retention and eviction"
                " will not see what the proxy serves",
            )
        self._flusher = asyncio.create_task(self._flush_loop())

    async def local_media(self, media_id: str) -> LocalMedia | None:
        metrics.cache_lookup("local_media", hit=media_id in self._rows)
        try:
            return self._rows[media_id]
        except KeyError:
            pass
        row = await self._inflight.run(
            media_id, lambda: self._bounded(self.db.local_media(media_id))
        )
        self._rows[media_id] = row
        return row

    async def local_thumbnails(self, media_id: str) -> list[ThumbnailRow]:
        try:
            return self._thumbnails[media_id]
        except KeyError:
            pass
        rows = await self._inflight_thumbnails.run(
            media_id, lambda: self._bounded(self.db.local_thumbnails(media_id))
        )
        self._thumbnails[media_id] = rows
        return rows

    async def remote_media(self, origin: str, media_id: str) -> RemoteMedia | None:
        key = (origin, media_id)
        metrics.cache_lookup("remote_media", hit=key in self._remote)
        try:
            return self._remote[key]
        except KeyError:
            pass
        row = await self._inflight_remote.run(
            key, lambda: self._bounded(self.db.remote_media(origin, media_id))
        )
        self._remote[key] = row
        return row

    async def remote_thumbnails(self, origin: str, media_id: str) -> list[ThumbnailRow]:
        key = (origin, media_id)
        try:
            return self._remote_thumbnails[key]
        except KeyError:
            pass
        rows = await self._inflight_remote_thumbnails.run(
            key, lambda: self._bounded(self.db.remote_thumbnails(origin, media_id))
        )
        self._remote_thumbnails[key] = rows
        return rows

    async def server_keys(self, server_name: str, key_id: str) -> list[KeyRow]:
        """`server_keys_json` rows for one key of another server (federation requests)."""
        key = (server_name, key_id)
        try:
            return self._keys[key]
        except KeyError:
            pass
        rows = await self._inflight_keys.run(
            key, lambda: self._bounded(self.db.server_keys(server_name, key_id))
        )
        if rows:  # a key Synapse is fetching right now is seen as soon as it is stored
            self._keys[key] = rows
        return rows

    async def _bounded(self, query: Coroutine[Any, Any, T]) -> T:
        """One query within the timeout; a slow or hung database is a DatabaseError.

        The query is left to finish its cancellation on its own: asyncpg cancels through
        the server, which a hung database never answers, so awaiting it would not bound.
        """
        task = asyncio.ensure_future(query)
        done, _ = await asyncio.wait({task}, timeout=self._timeout)
        if not done:
            task.cancel()
            task.add_done_callback(_retrieve)
            raise DatabaseError(f"no answer within {self._timeout} s")
        return task.result()

    def mark_accessed(self, media_id: str) -> None:
        if self._writable and len(self._accessed) < self._max_pending:
            self._accessed.add(media_id)

    def mark_remote_accessed(self, origin: str, media_id: str) -> None:
        """Remote rows' `last_access_ts` drives `remote_media_lifetime` and the evictor."""
        if self._writable and len(self._accessed_remote) < self._max_pending:
            self._accessed_remote.add((origin, media_id))

    async def flush(self) -> None:
        now_ms = int(time.time() * 1000)
        if self._accessed:
            batch, self._accessed = sorted(self._accessed), set()
            try:
                await self._bounded(self.db.touch_local(batch, now_ms))
            except DatabaseError as e:
                log.warning("access_times.flush_failed", error=str(e), count=len(batch))
        if self._accessed_remote:
            keys, self._accessed_remote = sorted(self._accessed_remote), set()
            try:
                await self._bounded(self.db.touch_remote(keys, now_ms))
            except DatabaseError as e:
                log.warning("access_times.flush_failed", error=str(e), count=len(keys), remote=True)

    async def _flush_loop(self) -> None:
        """Runs for the worker's life: no error may end it (a dead loop would let the
        pending access times grow until the cap, and never write them)."""
        while True:
            await asyncio.sleep(self._flush_interval)
            # Shielded: stopping the flusher (close) must not cut a write in half and close
            # the database under it; close waits for it instead.
            self._flushing = asyncio.ensure_future(self.flush())
            try:
                await asyncio.shield(self._flushing)
            except Exception as e:
                log.error("access_times.flush_error", error=repr(e))

    async def ping(self) -> None:
        """Raise DatabaseError unless the database answers a query now (readiness)."""
        await self.db.local_media("")  # no media id is empty: one indexed lookup, no row

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        if self._flushing is not None:
            with contextlib.suppress(Exception):  # logged by the flusher, if it still runs
                await self._flushing
        await self.flush()
        await self.db.close()
