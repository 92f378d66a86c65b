"""The S3 side of the media lifecycle: `media-proxy s3 prune` and `media-proxy s3 audit`.

Synapse deletes media (admin API, `media_retention`, `purge_media_cache`, URL-preview expiry)
from its database and local store only; storage providers have no delete, so the bucket only
grows. The database row, not the object, says whether media exists, so:

- every key under the provider's prefix is mapped back to its kind and ids (`parse_key`: the
  inverse of paths.py, accepted only when paths.py builds the very same key back);
- an object is an orphan when Synapse no longer has its media (`orphan_reason`): no row in
  `local_media_repository` / `remote_media_cache`, a thumbnail whose thumbnail row is gone, or a
  URL-preview file (never meant to be in S3) past Synapse's own expiry of preview media;
- `prune` deletes orphans at least `min_age` old (LastModified), batch by batch, re-reading
  each batch's rows right before its DeleteObjects; keys it cannot parse are never deleted;
- `audit` reports orphans, and every original Synapse lists that is in neither the store nor
  S3 ("lost").

Memory stays bounded by a page: objects are handled one listing page (1000 keys) at a time,
with one lookup of that page's rows (indexed by media id; remote media by origin and
`filesystem_id`, which has no index in Synapse's schema, so that lookup scans the origin's
rows of `remote_media_cache`). The audit walks the rows in key order with keyset pagination
(1000 rows a query, bytewise order) and merges them with a listing of the same key range, so
nothing is asked per file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import fcntl
import io
import json
import os
import posixpath
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Final

import structlog

from media_proxy import logs, paths
from media_proxy.config import Config, ConfigError, load, parse_duration
from media_proxy.inventory import Kind
from media_proxy.metadata import Database, DatabaseError, PostgresDatabase, open_database
from media_proxy.progress import Progress, human
from media_proxy.s3 import S3, S3Error
from media_proxy.upkeep import UsageError, run

log = structlog.get_logger("media_proxy.s3")

Out = Callable[[str], None]

# What S3 can hold; `--kinds` chooses among these.
KINDS: Final = (
    Kind.LOCAL_ORIGINAL,
    Kind.LOCAL_THUMBNAIL,
    Kind.REMOTE_ORIGINAL,
    Kind.REMOTE_THUMBNAIL,
    Kind.URL_PREVIEW,
)
# Synapse deletes URL-preview media (file, thumbnails, row) two days after download
# (url_previewer.py IMAGE_CACHE_EXPIRY_MS); its store file goes earlier, when the preview
# expires. Past that, an S3 copy serves nobody: Synapse never reads previews from providers.
URL_PREVIEW_EXPIRY_MS: Final = 2 * 86400 * 1000
DEFAULT_MIN_AGE: Final = 7 * 86400.0
PAGE: Final = 1000  # keys per listing page, rows per query page, keys per DeleteObjects
_IN_CHUNK: Final = 500  # values per IN (...) list on SQLite
# Unparseable keys and lost media listed in --json output (all are printed in text mode).
_LIST_CAP: Final = 10_000

_DATE: Final = re.compile(r"^\d\d\d\d-\d\d-\d\d$")
_THUMBNAIL_NAME: Final = re.compile(r"^\d+-\d+-[^-]+-.+$")


# --- keys -> kind and ids (pure) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What a store path names. `media_id` is the filesystem id for remote media."""

    kind: Kind
    media_id: str
    server_name: str = ""  # remote media only
    thumbnail: str = ""  # a thumbnail's file name; "" for originals

    @property
    def media(self) -> str:
        return f"{self.server_name}/{self.media_id}" if self.server_name else self.media_id


def _url_cache_thumbnail_dir(media_id: str) -> str:
    return "url_cache_thumbnails" + paths.url_cache_media(media_id).removeprefix("url_cache")


def parse_key(rel: str) -> KeyInfo | None:
    """The kind and ids of a store path (an S3 key less the prefix), or None when it is not
    a path Synapse writes: each component must be one paths.py accepts, and paths.py must
    build exactly `rel` back from the ids read, so traversal, odd sharding or extra
    components are refused, never guessed at."""
    if not rel or posixpath.normpath(rel) != rel or rel.startswith("/"):
        return None
    parts = rel.split("/")
    try:
        for part in parts:
            paths.component(part)
        info = _parse_parts(parts[0], parts[1:])
        if info is None or _build(info) != rel:
            return None
    except paths.PathError:
        return None
    if info.thumbnail and not _THUMBNAIL_NAME.match(info.thumbnail):
        return None
    return info


def _parse_parts(top: str, rest: list[str]) -> KeyInfo | None:
    n = len(rest)
    if top == "local_content" and n == 3:
        return KeyInfo(Kind.LOCAL_ORIGINAL, "".join(rest))
    if top == "local_thumbnails" and n == 4:
        return KeyInfo(Kind.LOCAL_THUMBNAIL, "".join(rest[:3]), thumbnail=rest[3])
    if top == "remote_content" and n == 4:
        return KeyInfo(Kind.REMOTE_ORIGINAL, "".join(rest[1:]), server_name=rest[0])
    if top == "remote_thumbnail" and n == 5:
        return KeyInfo(
            Kind.REMOTE_THUMBNAIL, "".join(rest[1:4]), server_name=rest[0], thumbnail=rest[4]
        )
    if top in ("url_cache", "url_cache_thumbnails"):
        name_parts = 1 if top == "url_cache_thumbnails" else 0
        ids = rest[: n - name_parts] if name_parts else rest
        if len(ids) == 2 and _DATE.match(ids[0]):
            media_id = f"{ids[0]}_{ids[1]}"
        elif len(ids) == 3:
            media_id = "".join(ids)
        else:
            return None
        return KeyInfo(Kind.URL_PREVIEW, media_id, thumbnail=rest[-1] if name_parts else "")
    return None


def _build(info: KeyInfo) -> str:
    """paths.py's path for `info` (raises PathError when the ids cannot form one)."""
    if info.kind is Kind.LOCAL_ORIGINAL:
        return paths.local_media(info.media_id)
    if info.kind is Kind.LOCAL_THUMBNAIL:
        return f"{paths.local_thumbnail_dir(info.media_id)}/{info.thumbnail}"
    if info.kind is Kind.REMOTE_ORIGINAL:
        return paths.remote_media(info.server_name, info.media_id)
    if info.kind is Kind.REMOTE_THUMBNAIL:
        return f"{paths.remote_thumbnail_dir(info.server_name, info.media_id)}/{info.thumbnail}"
    if info.thumbnail:
        return f"{_url_cache_thumbnail_dir(info.media_id)}/{info.thumbnail}"
    return paths.url_cache_media(info.media_id)


def thumbnail_names(width: int, height: int, content_type: str, method: str) -> tuple[str, ...]:
    """The file names a thumbnail row may have in S3: Synapse's, and the legacy one without
    the method (Synapse still looks remote thumbnails up by it; kept for local ones too)."""
    parts = content_type.split("/")
    if len(parts) != 2:
        return ()
    legacy = f"{int(width)}-{int(height)}-{parts[0]}-{parts[1]}"
    return (f"{legacy}-{method}", legacy)


# --- what the database holds for a batch of keys --------------------------------------------


@dataclass
class Rows:
    """The rows a batch of keys can belong to."""

    local: dict[str, tuple[int | None, bool]] = field(default_factory=dict)  # created, url
    local_thumbnails: dict[str, set[str]] = field(default_factory=dict)
    remote: set[tuple[str, str]] = field(default_factory=set)  # (origin, filesystem_id)
    remote_thumbnails: dict[tuple[str, str], set[str]] = field(default_factory=dict)


def orphan_reason(info: KeyInfo, rows: Rows, now_ms: int) -> str | None:
    """Why Synapse no longer has the media of this object, or None while it does."""
    if info.kind in (Kind.REMOTE_ORIGINAL, Kind.REMOTE_THUMBNAIL):
        key = (info.server_name, info.media_id)
        if key not in rows.remote:
            return "media_row_gone"
        if info.thumbnail and info.thumbnail not in rows.remote_thumbnails.get(key, ()):
            return "thumbnail_row_gone"
        return None
    row = rows.local.get(info.media_id)
    if row is None:
        return "media_row_gone"
    created_ts, url_cache = row
    if (
        info.kind is Kind.URL_PREVIEW
        and url_cache
        and created_ts is not None
        and created_ts < now_ms - URL_PREVIEW_EXPIRY_MS
    ):
        return "url_preview_expired"
    if info.thumbnail and info.thumbnail not in rows.local_thumbnails.get(info.media_id, ()):
        return "thumbnail_row_gone"
    return None


async def _fetch(db: Database, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """One read on either engine; `sql` uses `?` placeholders."""
    if isinstance(db, PostgresDatabase):
        for i in range(1, len(args) + 1):
            sql = sql.replace("?", f"${i}", 1)
        return [tuple(r) for r in await db._all(sql, *args)]
    return [tuple(r) for r in await db._all(sql, args)]  # type: ignore[attr-defined]


async def _fetch_in(
    db: Database, template: str, values: Sequence[str], *, before: Sequence[Any] = ()
) -> list[tuple[Any, ...]]:
    """Rows of `template` whose `IN ({})` matches any of `values`; `before` are the values
    of the `?` placeholders ahead of it."""
    if not values:
        return []
    if isinstance(db, PostgresDatabase):
        return await _fetch(
            db, template.replace("IN ({})", "= ANY(?::text[])"), [*before, list(values)]
        )
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(values), _IN_CHUNK):
        chunk = values[i : i + _IN_CHUNK]
        sql = template.format(",".join("?" * len(chunk)))
        rows += await _fetch(db, sql, [*before, *chunk])
    return rows


_LOCAL: Final = (
    "SELECT media_id, created_ts, url_cache FROM local_media_repository WHERE media_id IN ({})"
)
_LOCAL_THUMBNAILS: Final = (
    "SELECT media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method"
    " FROM local_media_repository_thumbnails WHERE media_id IN ({})"
)
# filesystem_id has no index: the origin (first column of the unique index) narrows the scan.
_REMOTE: Final = (
    "SELECT media_origin, filesystem_id FROM remote_media_cache"
    " WHERE media_origin = ? AND filesystem_id IN ({})"
)
_REMOTE_THUMBNAILS: Final = (
    "SELECT r.media_origin, r.filesystem_id, t.thumbnail_width, t.thumbnail_height,"
    " t.thumbnail_type, t.thumbnail_method FROM remote_media_cache_thumbnails AS t"
    " JOIN remote_media_cache AS r"
    " ON r.media_origin = t.media_origin AND r.media_id = t.media_id"
    " WHERE r.media_origin = ? AND r.filesystem_id IN ({})"
)


async def lookup(db: Database, infos: Iterable[KeyInfo]) -> Rows:
    """The rows of these keys' media (and thumbnails): two queries, and two per origin."""
    local_ids: set[str] = set()
    remote_ids: dict[str, set[str]] = {}
    for info in infos:
        if info.server_name:
            remote_ids.setdefault(info.server_name, set()).add(info.media_id)
        else:
            local_ids.add(info.media_id)
    rows = Rows()
    local = sorted(local_ids)
    for media_id, created_ts, url_cache in await _fetch_in(db, _LOCAL, local):
        rows.local[media_id] = (created_ts, url_cache is not None)
    for media_id, w, h, ctype, method in await _fetch_in(db, _LOCAL_THUMBNAILS, local):
        rows.local_thumbnails.setdefault(media_id, set()).update(
            thumbnail_names(w, h, ctype, method)
        )
    for server, fids in sorted(remote_ids.items()):
        remote = sorted(fids)
        for origin, fid in await _fetch_in(db, _REMOTE, remote, before=[server]):
            rows.remote.add((origin, fid))
        thumbnails = await _fetch_in(db, _REMOTE_THUMBNAILS, remote, before=[server])
        for origin, fid, w, h, ctype, method in thumbnails:
            rows.remote_thumbnails.setdefault((origin, fid), set()).update(
                thumbnail_names(w, h, ctype, method)
            )
    return rows


# --- the listing, classified page by page ---------------------------------------------------


@dataclass(slots=True)
class Obj:
    rel: str
    size: int
    modified: float  # LastModified, epoch seconds
    info: KeyInfo | None
    reason: str | None = None  # why it is an orphan; None: Synapse has its media


async def classified_pages(db: Database, s3: S3) -> AsyncIterator[list[Obj]]:
    """Every object under the prefix, a listing page at a time, with its orphan reason."""
    async for page in s3.list_pages(page_size=PAGE):
        objs = [Obj(rel, size, mtime, parse_key(rel)) for rel, size, mtime in page]
        rows = await lookup(db, (o.info for o in objs if o.info is not None))
        now_ms = int(time.time() * 1000)
        for o in objs:
            if o.info is not None:
                o.reason = orphan_reason(o.info, rows, now_ms)
        yield objs


class _Listing(Progress):
    """Progress of a listing, whose total is not known in advance."""

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        return (
            f"{self.what}: {self.files} objects, {human(self.bytes)},"
            f" {self.files / elapsed:.0f} objects/s"
        )


def _by_kind() -> dict[str, dict[str, int]]:
    return {k.value: {"objects": 0, "bytes": 0} for k in KINDS}


def _add(table: dict[str, dict[str, int]], kind: Kind, size: int) -> None:
    table[kind.value]["objects"] += 1
    table[kind.value]["bytes"] += size


def _kind_lines(title: str, table: dict[str, dict[str, int]]) -> list[str]:
    out = [f"  {title:20} {'objects':>10} {'size':>12}"]
    for kind, v in table.items():
        out.append(f"  {kind:20} {v['objects']:>10} {human(v['bytes']):>12}")
    return out


# --- prune ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneRules:
    min_age: float = DEFAULT_MIN_AGE
    kinds: frozenset[Kind] = frozenset(KINDS)
    dry_run: bool = False
    batch_size: int = PAGE


@dataclass
class PruneReport:
    dry_run: bool
    listed: int = 0
    listed_bytes: int = 0
    deleted: dict[str, dict[str, int]] = field(default_factory=_by_kind)
    kept: dict[str, dict[str, int]] = field(default_factory=_by_kind)
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_bytes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    unparseable: list[str] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0

    def skip(self, why: str, size: int) -> None:
        self.skipped[why] += 1
        self.skipped_bytes[why] += size

    @property
    def objects(self) -> int:
        return sum(v["objects"] for v in self.deleted.values())

    @property
    def bytes(self) -> int:
        return sum(v["bytes"] for v in self.deleted.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": "would delete" if self.dry_run else "deleted",
            "objects": self.objects,
            "bytes": self.bytes,
            "by_kind": self.deleted,
            "reasons": dict(sorted(self.reasons.items())),
            "kept_by_kind": self.kept,
            "listed": self.listed,
            "listed_bytes": self.listed_bytes,
            "skipped": {
                r: {"objects": n, "bytes": self.skipped_bytes[r]}
                for r, n in sorted(self.skipped.items())
            },
            "unparseable": self.unparseable[:_LIST_CAP],
            "seconds": round(self.seconds, 3),
        }

    def lines(self) -> list[str]:
        action = "would delete" if self.dry_run else "deleted"
        out = [
            f"{action}: {self.objects} objects, {human(self.bytes)} of {self.listed} listed"
            f" ({human(self.listed_bytes)}) in {self.seconds:.1f} s",
            *_kind_lines(action, self.deleted),
        ]
        for reason, n in sorted(self.reasons.items()):
            out.append(f"  because {reason}: {n} objects")
        kept = sum(v["objects"] for v in self.kept.values())
        out.append(f"  kept (Synapse has the media): {kept} objects")
        for why, n in sorted(self.skipped.items()):
            out.append(f"  skipped {why}: {n} objects, {human(self.skipped_bytes[why])}")
        return out


class Pruner:
    """Deletes orphans (see the module docstring), a batch at a time."""

    def __init__(
        self,
        db: Database,
        s3: S3,
        rules: PruneRules,
        *,
        out: Out,
        verbose: bool,
        show_progress: bool = True,
    ) -> None:
        self.db, self.s3, self.rules = db, s3, rules
        self.out, self.verbose, self.show_progress = out, verbose, show_progress
        self.report = PruneReport(rules.dry_run)

    async def run(self) -> PruneReport:
        started = time.monotonic()
        # Not a terminal, so a background pass logs its progress instead of drawing it.
        progress = _Listing("s3_prune", 0, 0, stream=None if self.show_progress else io.StringIO())
        pending: list[Obj] = []
        try:
            async for objs in classified_pages(self.db, self.s3):
                now = time.time()
                for o in objs:
                    progress.advance(1, o.size)
                    pending += self._candidate(o, now)
                while len(pending) >= self.rules.batch_size:
                    batch, pending = (
                        pending[: self.rules.batch_size],
                        pending[self.rules.batch_size :],
                    )
                    await self._delete(batch)
            while pending:
                batch, pending = pending[: self.rules.batch_size], pending[self.rules.batch_size :]
                await self._delete(batch)
        finally:
            progress.close()
            self.report.seconds = time.monotonic() - started
        return self.report

    def _candidate(self, o: Obj, now: float) -> list[Obj]:
        r = self.report
        r.listed += 1
        r.listed_bytes += o.size
        if o.info is None:
            r.skip("unparseable", o.size)
            if len(r.unparseable) < _LIST_CAP:
                r.unparseable.append(self.s3.key(o.rel))
            if self.verbose:
                self.out(f"unparseable {self.s3.key(o.rel)} {o.size}")
            log.info("s3_prune.unparseable", key=self.s3.key(o.rel), bytes=o.size)
            return []
        if o.info.kind not in self.rules.kinds:
            r.skip("kind_not_selected", o.size)
            return []
        if o.reason is None:
            _add(r.kept, o.info.kind, o.size)
            return []
        if now - o.modified < self.rules.min_age:
            r.skip("too_young", o.size)
            return []
        return [o]

    async def _delete(self, batch: list[Obj]) -> None:
        """Re-read the batch's rows, then delete what is still an orphan."""
        infos = [o.info for o in batch if o.info is not None]
        rows = await lookup(self.db, infos)
        now_ms = int(time.time() * 1000)
        doomed: list[Obj] = []
        for o in batch:
            assert o.info is not None
            reason = orphan_reason(o.info, rows, now_ms)
            if reason is None:
                self.report.skip("row_reappeared", o.size)
                _add(self.report.kept, o.info.kind, o.size)
                log.info("s3_prune.kept", key=self.s3.key(o.rel), reason="row_reappeared")
                continue
            o.reason = reason
            doomed.append(o)
        if not doomed:
            return
        errors: dict[str, str] = {}
        if not self.rules.dry_run:
            errors = await self.s3.delete_objects([o.rel for o in doomed])
        done = 0
        for o in doomed:
            assert o.info is not None and o.reason is not None
            if o.rel in errors:
                self.report.skip("delete_error", o.size)
                self.report.errors += 1
                log.warning("s3_prune.delete_error", key=self.s3.key(o.rel), code=errors[o.rel])
                continue
            _add(self.report.deleted, o.info.kind, o.size)
            self.report.reasons[o.reason] += 1
            done += 1
            if self.verbose and self.rules.dry_run:
                self.out(
                    f"would delete {o.info.kind.value} {self.s3.key(o.rel)} {o.size} {o.reason}"
                )
        log.info(
            "s3_prune.batch",
            dry_run=self.rules.dry_run,
            objects=done,
            bytes=sum(o.size for o in doomed if o.rel not in errors),
            errors=len(errors),
        )


class BackgroundPruner:
    """`serve` with `s3_prune_interval` (off by default): a prune pass per interval, with the
    rules of `s3 prune` and `s3_prune_min_age`, in the upkeep process (never a serving loop:
    a pass lists the whole bucket), holding an flock on `<cache>/.media-proxy/s3-prune.lock`
    so that one process per cache prunes. Nothing is printed; each pass logs one
    `s3_prune.pass` event."""

    def __init__(self, config: Config, s3: S3) -> None:
        assert config.s3_prune_interval is not None
        self.config, self.s3 = config, s3
        self.interval = config.s3_prune_interval
        self.rules = PruneRules(min_age=config.s3_prune_min_age)
        self.lock_path = config.cache_path / paths.STATE_DIR / "s3-prune.lock"
        self.db: Database | None = None
        self._fd = -1
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except (DatabaseError, S3Error, OSError) as e:
                log.warning("s3_prune.pass_failed", error=str(e))
            except Exception:
                log.exception("s3_prune.pass_failed")

    def _locked(self) -> bool:
        if self._fd >= 0:
            return True
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def tick(self) -> PruneReport | None:
        """One pass, if this process holds the lock."""
        if not self._locked():
            return None
        if self.db is None:
            self.db = await open_database(self.config.database)
        pruner = Pruner(
            self.db, self.s3, self.rules, out=lambda _: None, verbose=False, show_progress=False
        )
        report = await pruner.run()
        summary = report.as_dict()
        summary["unparseable"] = report.skipped["unparseable"]
        log.info("s3_prune.pass", **summary)
        return report

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.db is not None:
            await self.db.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- audit ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Lost:
    kind: Kind
    media_id: str
    server_name: str  # "" for local media
    remote_media_id: str  # the origin's media id (remote media); "" for local
    length: int | None
    created_ts: int | None
    uploader: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "media_id": self.remote_media_id or self.media_id,
            "filesystem_id": self.media_id if self.server_name else None,
            "origin": self.server_name or None,
            "bytes": self.length,
            "created": _iso(self.created_ts),
            "uploader": self.uploader,
        }

    def line(self) -> str:
        d = self.as_dict()
        where = f"mxc://{d['origin']}/{d['media_id']}" if self.server_name else self.media_id
        fid = f" filesystem_id={self.media_id}" if self.server_name else ""
        return (
            f"LOST {self.kind.value} {where}{fid} bytes={self.length}"
            f" created={d['created']} uploader={self.uploader or '-'}"
        )


def _iso(ts_ms: int | None) -> str | None:
    if ts_ms is None:
        return None
    return datetime.datetime.fromtimestamp(ts_ms / 1000, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )


@dataclass
class AuditReport:
    listed: int = 0
    listed_bytes: int = 0
    known: dict[str, dict[str, int]] = field(default_factory=_by_kind)
    orphans: dict[str, dict[str, int]] = field(default_factory=_by_kind)
    orphans_young: dict[str, dict[str, int]] = field(default_factory=_by_kind)
    unparseable: list[str] = field(default_factory=list)
    unparseable_count: int = 0
    unparseable_bytes: int = 0
    # Originals Synapse lists: where they are.
    media: dict[str, Counter[str]] = field(
        default_factory=lambda: {
            k.value: Counter() for k in (Kind.LOCAL_ORIGINAL, Kind.REMOTE_ORIGINAL)
        }
    )
    lost: list[Lost] = field(default_factory=list)
    lost_count: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "listed": self.listed,
            "listed_bytes": self.listed_bytes,
            "known_by_kind": self.known,
            "orphans": sum(v["objects"] for v in self.orphans.values()),
            "orphan_bytes": sum(v["bytes"] for v in self.orphans.values()),
            "orphans_by_kind": self.orphans,
            "orphans_younger_than_7d_by_kind": self.orphans_young,
            "unparseable": self.unparseable_count,
            "unparseable_bytes": self.unparseable_bytes,
            "unparseable_keys": self.unparseable[:_LIST_CAP],
            "media": {k: dict(sorted(v.items())) for k, v in self.media.items()},
            "lost": self.lost_count,
            "lost_media": [m.as_dict() for m in self.lost[:_LIST_CAP]],
            "seconds": round(self.seconds, 3),
        }

    def lines(self) -> list[str]:
        orphans = sum(v["objects"] for v in self.orphans.values())
        orphan_bytes = sum(v["bytes"] for v in self.orphans.values())
        out = [
            f"S3: {self.listed} objects, {human(self.listed_bytes)} (audit: {self.seconds:.1f} s);"
            f" orphans (Synapse no longer has their media): {orphans}, {human(orphan_bytes)}",
            *_kind_lines("orphans", self.orphans),
            *_kind_lines("of which < 7 days old", self.orphans_young),
            f"  unparseable keys (never pruned): {self.unparseable_count},"
            f" {human(self.unparseable_bytes)}",
        ]
        for kind, c in self.media.items():
            out.append(
                f"media rows, {kind}: {_rows_total(c)}; in store and S3 {c['both']},"
                f" store only {c['store_only']}, S3 only {c['s3_only']}, nowhere {c['nowhere']}"
                f" (S3 object of another size {c['s3_size_differs']},"
                f" pending uploads {c['pending']}, ids without a path {c['bad_id']})"
            )
        if self.lost_count:
            out.append(
                f"LOST: {self.lost_count} media that Synapse lists are in neither the store nor"
                " S3 (listed above)"
            )
        else:
            out.append("no lost media: every media row has its file in the store or in S3")
        return out


def _rows_total(c: Counter[str]) -> int:
    """Rows counted once each (`s3_size_differs` is a detail of `store_only`/`nowhere`)."""
    return sum(c[k] for k in ("both", "store_only", "s3_only", "nowhere", "pending", "bad_id"))


# A row's (media id or filesystem id, origin, origin's media id, length, created_ts, uploader).
_Fields = tuple[str, str, str, int | None, int | None, str | None]

_LOCAL_PAGE: Final = (
    "SELECT media_id, media_length, created_ts, user_id FROM local_media_repository"
    " WHERE media_id > ? AND url_cache IS NULL ORDER BY media_id{collate} LIMIT {limit}"
)
_ORIGINS: Final = "SELECT DISTINCT media_origin FROM remote_media_cache"
_REMOTE_PAGE: Final = (
    "SELECT filesystem_id, media_length, created_ts, media_id FROM remote_media_cache"
    " WHERE media_origin = ? AND filesystem_id > ? ORDER BY filesystem_id{collate}"
    " LIMIT {limit}"
)


async def _binary_order(db: Database) -> str:
    """What ORDER BY needs to sort text as S3 lists keys (bytewise). Synapse wants its
    PostgreSQL database in the C locale, where the column's own order is bytewise and its
    index serves; other locales need an explicit COLLATE "C" (a sort per page)."""
    if not isinstance(db, PostgresDatabase):
        return ""  # SQLite compares text bytewise
    rows = await _fetch(db, "SELECT datcollate FROM pg_database WHERE datname = current_database()")
    return "" if rows and rows[0][0] in ("C", "POSIX") else ' COLLATE "C"'


class Auditor:
    def __init__(self, db: Database, s3: S3, roots: Sequence[str], *, out: Out, verbose: bool):
        self.db, self.s3, self.roots = db, s3, list(dict.fromkeys(roots))
        self.out, self.verbose = out, verbose
        self.report = AuditReport()
        self._collate = ""

    async def run(self) -> AuditReport:
        started = time.monotonic()
        self._collate = await _binary_order(self.db)
        try:
            await self._objects()
            await self._local_rows()
            await self._remote_rows()
        finally:
            self.report.seconds = time.monotonic() - started
        return self.report

    async def _objects(self) -> None:
        r = self.report
        progress = _Listing("s3_audit", 0, 0)
        try:
            async for objs in classified_pages(self.db, self.s3):
                now = time.time()
                for o in objs:
                    progress.advance(1, o.size)
                    r.listed += 1
                    r.listed_bytes += o.size
                    if o.info is None:
                        r.unparseable_count += 1
                        r.unparseable_bytes += o.size
                        if len(r.unparseable) < _LIST_CAP:
                            r.unparseable.append(self.s3.key(o.rel))
                        if self.verbose:
                            self.out(f"unparseable {self.s3.key(o.rel)} {o.size}")
                    elif o.reason is None:
                        _add(r.known, o.info.kind, o.size)
                    else:
                        _add(r.orphans, o.info.kind, o.size)
                        if now - o.modified < DEFAULT_MIN_AGE:
                            _add(r.orphans_young, o.info.kind, o.size)
        finally:
            progress.close()

    async def _objects_in(self, rel_prefix: str) -> AsyncIterator[tuple[str, int]]:
        """(store path, size) under `rel_prefix`, checked to come in strictly rising order
        (the merge below depends on it; S3 lists in UTF-8 binary order)."""
        last = ""
        async for page in self.s3.list_pages(rel_prefix, page_size=PAGE):
            for rel, size, _ in page:
                if rel <= last:
                    raise UsageError(f"S3 listing out of key order at {rel!r}: cannot audit")
                last = rel
                yield rel, size

    async def _merge(
        self, rel_prefix: str, rows: AsyncIterator[tuple[str, Any]]
    ) -> AsyncIterator[tuple[str, Any, int | None]]:
        """(key, row, size of the S3 object at key or None), for rows rising in key order."""
        objects = aiter(self._objects_in(rel_prefix))
        current = await anext(objects, None)
        last = ""
        async for key, row in rows:
            if key <= last:
                raise UsageError(f"database rows out of key order at {key!r}: cannot audit")
            last = key
            while current is not None and current[0] < key:
                current = await anext(objects, None)
            yield key, row, current[1] if current is not None and current[0] == key else None

    async def _local_rows(self) -> None:
        async def rows() -> AsyncIterator[tuple[str, Any]]:
            after = ""
            sql = _LOCAL_PAGE.format(collate=self._collate, limit=PAGE)
            while True:
                page = await _fetch(self.db, sql, (after,))
                if not page:
                    return
                for row in page:
                    try:
                        yield paths.local_media(row[0]), row
                    except paths.PathError:
                        self.report.media[Kind.LOCAL_ORIGINAL.value]["bad_id"] += 1
                after = page[-1][0]

        await self._check(
            Kind.LOCAL_ORIGINAL,
            "local_content/",
            rows(),
            lambda row: (row[0], "", "", row[1], row[2], row[3]),
        )

    async def _remote_rows(self) -> None:
        origins = [o for (o,) in await _fetch(self.db, _ORIGINS)]
        for origin in sorted(origins, key=lambda o: f"{o}/"):
            try:
                prefix = f"remote_content/{paths.component(origin)}/"
            except paths.PathError:
                self.report.media[Kind.REMOTE_ORIGINAL.value]["bad_id"] += 1
                continue

            async def rows(origin: str = origin) -> AsyncIterator[tuple[str, Any]]:
                after = ""
                sql = _REMOTE_PAGE.format(collate=self._collate, limit=PAGE)
                while True:
                    page = await _fetch(self.db, sql, (origin, after))
                    if not page:
                        return
                    for row in page:
                        try:
                            yield paths.remote_media(origin, row[0]), row
                        except paths.PathError:
                            self.report.media[Kind.REMOTE_ORIGINAL.value]["bad_id"] += 1
                    after = page[-1][0]

            def fields(row: Any, origin: str = origin) -> _Fields:
                return row[0], origin, row[3], row[1], row[2], None

            await self._check(Kind.REMOTE_ORIGINAL, prefix, rows(), fields)

    async def _check(
        self,
        kind: Kind,
        rel_prefix: str,
        rows: AsyncIterator[tuple[str, Any]],
        fields: Callable[[Any], _Fields],
    ) -> None:
        """Where each row's original is; lost ones are printed and logged as found."""
        counts = self.report.media[kind.value]
        batch: list[tuple[str, Any, int | None]] = []

        async def flush() -> None:
            present = await asyncio.to_thread(self._in_store, [(k, r) for k, r, _ in batch])
            for (_, row, s3_size), in_store in zip(batch, present, strict=True):
                media_id, server, remote_id, length, created, uploader = fields(row)
                in_s3 = s3_size is not None and s3_size == length
                if s3_size is not None and not in_s3:
                    counts["s3_size_differs"] += 1
                if in_s3 and in_store:
                    counts["both"] += 1
                elif in_store:
                    counts["store_only"] += 1
                elif in_s3:
                    counts["s3_only"] += 1
                else:
                    counts["nowhere"] += 1
                    self._lost(Lost(kind, media_id, server, remote_id, length, created, uploader))
            batch.clear()

        async for key, row, s3_size in self._merge(rel_prefix, rows):
            if fields(row)[3] is None:  # media_length NULL: created, not uploaded yet
                counts["pending"] += 1
                continue
            batch.append((key, row, s3_size))
            if len(batch) >= PAGE:
                await flush()
        await flush()

    def _in_store(self, items: list[tuple[str, Any]]) -> list[bool]:
        """Whether each original is in the store (or cache) with the row's length."""
        out = []
        for key, row in items:
            length = row[1]
            found = False
            for root in self.roots:
                try:
                    found = os.stat(os.path.join(root, key)).st_size == length
                except OSError:
                    found = False
                if found:
                    break
            out.append(found)
        return out

    def _lost(self, media: Lost) -> None:
        r = self.report
        r.lost_count += 1
        if len(r.lost) < _LIST_CAP:
            r.lost.append(media)
        log.warning("s3_audit.lost", **media.as_dict())
        if self.verbose:
            self.out(media.line())


# --- commands ---------------------------------------------------------------------------------


@asynccontextmanager
async def _parts(config: Config) -> AsyncIterator[tuple[Database, S3]]:
    if config.s3 is None:
        raise UsageError(
            "no s3_storage_provider.S3StorageProviderBackend in the Synapse config (or s3: key)"
        )
    db = await open_database(config.database)
    s3 = S3(config.s3)
    try:
        await s3.start()
        yield db, s3
    finally:
        await s3.close()
        await db.close()


async def run_prune(config: Config, rules: PruneRules, *, as_json: bool, out: Out = print) -> int:
    async with _parts(config) as (db, s3):
        report = await Pruner(db, s3, rules, out=out, verbose=not as_json).run()
    if as_json:
        out(json.dumps(report.as_dict(), sort_keys=True))
    else:
        for line in report.lines():
            out(line)
    return 1 if report.errors else 0


async def run_audit(config: Config, *, as_json: bool, out: Out = print) -> int:
    """Exit status 3 when media are lost (1 is left to errors, 2 to bad input)."""
    roots = [str(config.media_store_path), str(config.cache_path)]
    async with _parts(config) as (db, s3):
        report = await Auditor(db, s3, roots, out=out, verbose=not as_json).run()
    if as_json:
        out(json.dumps(report.as_dict(), sort_keys=True))
    else:
        for line in report.lines():
            out(line)
    return 3 if report.lost_count else 0


def parse_kinds(value: str | None) -> frozenset[Kind]:
    if value is None:
        return frozenset(KINDS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    known = {k.value: k for k in KINDS}
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(
            "command line", "--kinds", f"expected some of {', '.join(known)}, got {value!r}"
        )
    return frozenset(known[n] for n in names)


def _config(args: argparse.Namespace) -> Config:
    return load(
        config_file=args.config,
        synapse_config=args.synapse_config,
        overrides={
            "cache_path": getattr(args, "cache_path", None),
            "log_format": getattr(args, "log_format", None),
        },
        need_synapse_url=False,
    )


def main(args: argparse.Namespace) -> int:
    """`media-proxy s3 prune|audit`: configuration as for `cache`, one line for bad input."""
    try:
        config = _config(args)
    except ConfigError as e:
        print(f"media-proxy: configuration error: {e}", file=sys.stderr)
        return 2
    logs.configure(config.log_format, config.log_level)
    try:
        if args.s3_command == "audit":
            return run(run_audit(config, as_json=args.json))
        batch = args.batch_size
        if not batch.isdigit() or not 1 <= int(batch) <= PAGE:
            raise ConfigError("command line", "--batch-size", f"expected 1 to {PAGE}")
        rules = PruneRules(
            min_age=parse_duration(args.min_age, source="command line", key="--min-age"),
            kinds=parse_kinds(args.kinds),
            dry_run=args.dry_run,
            batch_size=int(batch),
        )
    except ConfigError as e:
        print(f"media-proxy: {e.key}: {e.problem}", file=sys.stderr)
        return 2
    return run(run_prune(config, rules, as_json=args.json))
