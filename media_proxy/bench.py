"""`media-proxy bench`: a bounded load of media downloads against any base URL.

Drives media-proxy, nginx in front of it, or Synapse itself with the same client, over media
sampled from Synapse's database or listed as `mxc://` URIs, and reports what came back:
requests/s and MB/s of *verified* answers (a fast wrong answer never counts), latency and
time-to-first-byte percentiles, errors by status, and the S3 GETs the proxy made (from its
Prometheus metrics when given, else "unknown").

The driver is one asyncio loop over one aiohttp session whose connection limit is the
concurrency: a load tool like wrk cannot evict a file before its request, key requests by
id, or hash bodies against the database's sha256, and the client is already a dependency.

Misses evict a file from the store before its request, only files S3 holds with their
length, and only when `--evict-from` names the configured store (never a store the bench
was not told it may touch).

The pure parts (percentiles, sampling SQL, request planning, verification, the report)
come first; database, S3, disk and HTTP follow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import re
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO

import aiohttp

from media_proxy import paths
from media_proxy.config import Config, ConfigError, load, parse_duration, parse_size

Mode = Literal["hit", "miss", "mixed", "thumbnails", "ranges"]
MODES: Final = ("hit", "miss", "mixed", "thumbnails", "ranges")
Api = Literal["client", "legacy", "store"]
KINDS: Final = ("image", "video", "audio", "other")
READ_CHUNK: Final = 256 * 1024
# Range requests span this much by default: what a player asks for after a seek.
DEFAULT_RANGE_SPAN: Final = 1024 * 1024
_PROGRESS_S: Final = 0.5
# The longest wait for a fill that outlives its answer before evicting its file again.
_FILL_SETTLE_S: Final = 10.0
_FILL_POLL_S: Final = 0.002


class BenchError(Exception):
    """Bad input or an impossible run: one line, exit status 2."""


# --- pure parts -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Thumb:
    width: int
    height: int
    method: str
    length: int | None


@dataclass(frozen=True, slots=True)
class Target:
    """One media file to request. `length`/`sha256` come from the database when known;
    `url` replaces the built URL (a presigned S3 URL, say)."""

    server_name: str
    media_id: str
    length: int | None = None
    sha256: str | None = None
    media_type: str | None = None
    thumb: Thumb | None = None
    url: str | None = None

    @property
    def rel(self) -> str:
        return paths.local_media(self.media_id)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100); 0.0 when empty.

    Nearest rank always returns a value that was measured: p100 is the max, and p99 of 10
    samples is the slowest one, not an interpolation between two."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(values: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/max in milliseconds, from seconds."""
    ordered = sorted(values)
    return {
        name: round(percentile(ordered, q) * 1000, 3)
        for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
    }


def kind_of(media_type: str | None) -> str:
    major = (media_type or "").split("/", 1)[0].lower()
    return major if major in KINDS else "other"


def parse_uris(text: str, *, source: str) -> list[tuple[str, str]]:
    """(server_name, media_id) per `mxc://` line; blank lines and `#` comments are skipped."""
    out: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        server, _, media_id = line.removeprefix("mxc://").partition("/")
        try:
            if not line.startswith("mxc://"):
                raise paths.PathError("expected mxc://SERVER/MEDIA_ID")
            paths.component(server)
            paths.component(media_id)
        except paths.PathError as e:
            raise BenchError(f"{source}:{number}: not an mxc URI ({e}): {line!r}") from None
        out.append((server, media_id))
    if not out:
        raise BenchError(f"{source}: no mxc:// URI in the file")
    return out


_USABLE: Final = "m.quarantined_by IS NULL AND m.url_cache IS NULL AND m.media_length IS NOT NULL"


def sample_sql(
    *,
    thumbnails: bool,
    kind: str | None,
    min_size: int | None,
    max_size: int | None,
    limit: int,
    postgres: bool,
) -> tuple[str, list[Any]]:
    """A random sample of usable local media (not quarantined, not URL previews, uploaded),
    filtered by kind (major MIME type) and size (of the file, or of the thumbnail)."""
    where, args = [_USABLE], list[Any]()
    size_col = "t.thumbnail_length" if thumbnails else "m.media_length"
    if kind in ("image", "video", "audio"):
        where.append("m.media_type LIKE ?")
        args.append(f"{kind}/%")
    elif kind == "other":
        where.append(
            "(m.media_type IS NULL OR NOT (m.media_type LIKE 'image/%'"
            " OR m.media_type LIKE 'video/%' OR m.media_type LIKE 'audio/%'))"
        )
    elif kind is not None:
        raise BenchError(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if min_size is not None:
        where.append(f"{size_col} >= ?")
        args.append(min_size)
    if max_size is not None:
        where.append(f"{size_col} <= ?")
        args.append(max_size)
    if thumbnails:
        sql = (
            "SELECT m.media_id, m.media_type, m.media_length, m.sha256, t.thumbnail_width,"
            " t.thumbnail_height, t.thumbnail_method, t.thumbnail_length"
            " FROM local_media_repository_thumbnails AS t"
            " JOIN local_media_repository AS m ON m.media_id = t.media_id"
        )
    else:
        sql = (
            "SELECT m.media_id, m.media_type, m.media_length, m.sha256"
            " FROM local_media_repository AS m"
        )
    sql += " WHERE " + " AND ".join(where) + " ORDER BY random() LIMIT ?"
    args.append(limit)
    return (_numbered(sql) if postgres else sql), args


def _numbered(sql: str) -> str:
    """`?` placeholders to PostgreSQL's `$1, $2, ...`."""
    count = iter(range(1, sql.count("?") + 1))
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


def target_from_row(server_name: str, row: Sequence[Any], *, thumbnails: bool) -> Target:
    thumb = Thumb(int(row[4]), int(row[5]), str(row[6]), row[7]) if thumbnails else None
    return Target(server_name, row[0], row[2], row[3], row[1], thumb)


def check_evict_from(evict_from: Path | None, store: Path | None, mode: str) -> Path | None:
    """The store the bench may evict from: only in modes that evict, only when named, and only
    when it is the configured one. Returns None in the modes that never evict."""
    if mode not in ("miss", "mixed"):
        if evict_from is not None:
            raise BenchError(f"--evict-from: only miss and mixed modes evict, not {mode}")
        return None
    if evict_from is None:
        raise BenchError(
            f"--evict-from: required in {mode} mode: the store path the bench may delete"
            " files from (it must be the configured store)"
        )
    if store is None:
        raise BenchError("--evict-from: needs --synapse-config to know the configured store")
    if evict_from.resolve() != store.resolve():
        raise BenchError(f"--evict-from: {evict_from} is not the configured store {store}")
    return store.resolve()


@dataclass(frozen=True, slots=True)
class Planned:
    """One request: its target, whether its file is evicted first, its range, whether its body
    is hashed."""

    n: int
    target: Target
    miss: bool = False
    byte_range: tuple[int, int] | None = None
    verify: bool = False


def seek_range(length: int | None, span: int, rng: random.Random) -> tuple[int, int]:
    """`bytes=a-b` as a player asks after a seek: a random start, `span` bytes or to the end."""
    if not length:
        return 0, span - 1
    start = rng.randrange(length)
    return start, min(start + span, length) - 1


@dataclass
class Planner:
    """What each request is; the same for the same seed (so runs can be repeated)."""

    mode: Mode
    targets: Sequence[Target]
    miss_targets: Sequence[Target] = ()
    miss_ratio: float = 0.0
    verify_ratio: float = 0.1
    range_span: int = DEFAULT_RANGE_SPAN
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.seed is None:
            self.seed = random.randrange(2**32)
        if not self.targets:
            raise BenchError("no media to request")
        if self.mode in ("miss", "mixed") and not self.miss_targets:
            raise BenchError("no media can be a miss: S3 holds none of the sampled files")

    def plan(self, n: int) -> Planned:
        """Request `n`: a function of the seed and `n` alone, whatever order workers ask in."""
        rng = random.Random(f"{self.seed}-{n}")
        verify = rng.random() < self.verify_ratio
        miss = self.mode == "miss" or (self.mode == "mixed" and rng.random() < self.miss_ratio)
        pool = self.miss_targets if miss else self.targets
        target = pool[n % len(pool)] if n < len(pool) else rng.choice(pool)
        byte_range = None
        if self.mode == "ranges":
            byte_range = seek_range(target.length, self.range_span, rng)
        return Planned(n, target, miss, byte_range, verify)


_CONTENT_RANGE: Final = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def expected_range(requested: tuple[int, int], length: int | None) -> tuple[int, int] | None:
    """The part a server must send for `bytes=a-b` of a file of `length` (None: unsatisfiable)."""
    start, end = requested
    if length is not None:
        if start >= length:
            return None
        end = min(end, length - 1)
    return start, end


def verify(
    planned: Planned,
    status: int,
    content_range: str | None,
    received: int,
    sha256: str | None,
) -> str | None:
    """Why an answer is wrong, or None when it is right as far as is known.

    Full answers must have the database's length, and its sha256 when the body was hashed;
    a 206 must be the part asked for; thumbnails must not be empty (which stored thumbnail
    is sent is the server's choice)."""
    t = planned.target
    if planned.byte_range is not None and status == 206:
        m = _CONTENT_RANGE.match(content_range or "")
        if m is None:
            return "bad_content_range"
        if t.length is not None and m[3] != str(t.length):
            return "wrong_length"
        total = t.length if t.length is not None else (None if m[3] == "*" else int(m[3]))
        want = expected_range(planned.byte_range, total)
        got = int(m[1]), int(m[2])
        if want is None or got != want:
            return "wrong_range"
        return None if received == got[1] - got[0] + 1 else "wrong_length"
    if status != 200:
        return f"status_{status}"
    if t.thumb is not None:
        return None if received > 0 else "empty_thumbnail"
    if t.length is not None and received != t.length:
        return "wrong_length"
    if sha256 is not None and t.sha256 is not None and sha256 != t.sha256.lower():
        return "wrong_sha256"
    return None


def expected_statuses(mode: str) -> frozenset[int]:
    """A 206, or a 200 with the whole file, to a range (ours are always satisfiable)."""
    return frozenset({200, 206}) if mode == "ranges" else frozenset({200})


@dataclass(slots=True)
class Result:
    n: int
    miss: bool
    status: int | None  # None: no answer (connection error, timeout)
    error: str | None  # None: a verified success
    seconds: float
    ttfb: float
    bytes: int
    verified: bool


def summarize(
    results: Sequence[Result],
    elapsed: float,
    *,
    s3_gets: float | None,
    s3_wait_ms: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The report: rates and percentiles of verified successes; errors by status or reason."""
    ok = [r for r in results if r.error is None]
    elapsed = max(elapsed, 1e-9)
    statuses = Counter(str(r.status) if r.status is not None else "none" for r in results)
    errors = Counter(r.error for r in results if r.error is not None)

    def part(rs: Sequence[Result]) -> dict[str, Any]:
        return {
            "requests": len(rs),
            "latency_ms": latency_summary(r.seconds for r in rs),
            "ttfb_ms": latency_summary(r.ttfb for r in rs),
        }

    report: dict[str, Any] = {
        "requests": len(results),
        "ok": len(ok),
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(ok) / elapsed, 1),
        "bytes": sum(r.bytes for r in ok),
        "mb_per_s": round(sum(r.bytes for r in ok) / elapsed / 1e6, 2),
        "latency_ms": latency_summary(r.seconds for r in ok),
        "ttfb_ms": latency_summary(r.ttfb for r in ok),
        "statuses": dict(sorted(statuses.items())),
        "errors": dict(sorted(errors.items())),
        "verified_sha256": sum(1 for r in ok if r.verified),
        "misses": sum(1 for r in results if r.miss),
        "s3_gets": "unknown" if s3_gets is None else int(s3_gets),
    }
    if s3_wait_ms is not None:
        report["s3_get_wait_ms"] = s3_wait_ms
    if any(r.miss for r in ok) and not all(r.miss for r in ok):
        report["hit"] = part([r for r in ok if not r.miss])
        report["miss"] = part([r for r in ok if r.miss])
    report.update(extra or {})
    return report


def format_report(report: dict[str, Any]) -> str:
    lat, ttfb = report["latency_ms"], report["ttfb_ms"]
    lines = [
        f"{report.get('mode', 'bench')} {report.get('url', '')}: {report['requests']} requests"
        f" in {report['seconds']:.1f} s, {report['ok']} ok"
        f" ({report['verified_sha256']} sha256-verified), {report['misses']} misses",
        f"  {report['requests_per_s']:.1f} req/s, {report['mb_per_s']:.2f} MB/s",
        "  latency ms: " + ", ".join(f"{k} {v:g}" for k, v in lat.items()),
        "  ttfb ms:    " + ", ".join(f"{k} {v:g}" for k, v in ttfb.items()),
        "  statuses: " + (", ".join(f"{k}: {v}" for k, v in report["statuses"].items()) or "-"),
        "  errors:   " + (", ".join(f"{k}: {v}" for k, v in report["errors"].items()) or "none"),
        f"  S3 GETs:  {report['s3_gets']}"
        + (
            f" (S3 answered in {report['s3_get_wait_ms']:g} ms on average, as the proxy saw it)"
            if "s3_get_wait_ms" in report
            else ""
        ),
    ]
    for part in ("hit", "miss"):
        if part in report:
            p = report[part]
            lines.append(
                f"  {part}: {p['requests']} ok, latency p50 {p['latency_ms']['p50']:g} ms,"
                f" ttfb p50 {p['ttfb_ms']['p50']:g} ms"
            )
    return "\n".join(lines)


_SAMPLE: Final = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)


def parse_prometheus(text: str) -> list[tuple[str, str, float]]:
    """(name, raw labels, value) of every sample in Prometheus' text format."""
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None:
            continue
        try:
            out.append((m["name"], m["labels"] or "", float(m["value"])))
        except ValueError:
            continue
    return out


def s3_get_count(samples: Iterable[tuple[str, str, float]]) -> float | None:
    """The S3 GETs counted in a metrics page, None if it has no such counter.

    The counter is recognised by name: it mentions s3, and get (in its name or as a label
    value such as operation="GetObject"); `_total` is preferred to a histogram's `_count`,
    and buckets and sums never count."""
    found: dict[str, float] = {}
    for name, labels, value in samples:
        low = name.lower()
        if "s3" not in low or low.endswith(("_bucket", "_sum", "_created")):
            continue
        if "get" not in low and not re.search(r'="(?i:get|getobject)"', labels):
            continue
        if not low.endswith(("_total", "_count")) and "get" not in low:
            continue
        found[name] = found.get(name, 0.0) + value
    for suffix in ("_total", "_count", ""):
        for name, value in sorted(found.items()):
            if name.endswith(suffix):
                return value
    return None


def request_path(target: Target, api: Api) -> str:
    """The path (and query) of a download or thumbnail of `target` in the chosen API."""
    if api == "store":
        return "/" + target.rel
    kind = "thumbnail" if target.thumb is not None else "download"
    prefix = "/_matrix/client/v1/media" if api == "client" else "/_matrix/media/v3"
    path = f"{prefix}/{kind}/{target.server_name}/{target.media_id}"
    if target.thumb is not None:
        t = target.thumb
        path += f"?width={t.width}&height={t.height}&method={t.method}"
    return path


# --- I/O ----------------------------------------------------------------------------------


@dataclass
class Options:
    """One run. `requests` and `duration` bound it (whichever comes first); `rate` paces it."""

    url: str
    mode: Mode = "hit"
    token: str | None = None
    api: Api = "client"
    concurrency: int = 8
    duration: float | None = 10.0
    requests: int | None = None
    rate: float | None = None
    miss_ratio: float = 0.0
    verify_ratio: float = 0.1
    range_span: int = DEFAULT_RANGE_SPAN
    seed: int | None = None
    evict_store: Path | None = None  # checked by check_evict_from
    metrics_url: str | None = None
    request_id_prefix: str = field(default_factory=lambda: f"bench-{os.urandom(4).hex()}")
    progress: TextIO | None = None  # a terminal to redraw a progress line on
    timeout: float = 300.0


async def _scrape(session: aiohttp.ClientSession, url: str | None) -> list[tuple[str, str, float]]:
    """The samples of a metrics page; none when there is no page (or no URL)."""
    if url is None:
        return []
    try:
        async with session.get(url) as resp:
            if resp.status != 200:
                return []
            return parse_prometheus(await resp.text())
    except (aiohttp.ClientError, TimeoutError):
        return []


def s3_gets_between(
    before: list[tuple[str, str, float]], after: list[tuple[str, str, float]]
) -> float | None:
    """S3 GETs made between two scrapes; None when unknown. A counter absent from the first
    page but present in the second started during the run (labelled counters appear at
    their first use)."""
    if not before or not after:
        return None
    end = s3_get_count(after)
    return None if end is None else end - (s3_get_count(before) or 0.0)


# media-proxy's own histogram (README, Metrics): time S3 took to answer, to the response head.
_S3_WAIT: Final = "media_proxy_s3_request_duration_seconds"


def s3_get_wait_ms(
    before: list[tuple[str, str, float]], after: list[tuple[str, str, float]]
) -> float | None:
    """The mean time S3 took to answer the proxy's GETs between two scrapes (to the response
    head, as the proxy measured it); None when unknown or no GET was made. A miss's time to
    first byte less this is the proxy's own share: S3 answers a GET paced by a proxy's
    misses more slowly than the back-to-back GETs of an "S3 direct" row (idle servers wake
    up), so the difference of the two rows overstates what the proxy adds."""

    def totals(samples: list[tuple[str, str, float]]) -> tuple[float, float]:
        got = {"_sum": 0.0, "_count": 0.0}
        for name, labels, value in samples:
            suffix = name.removeprefix(_S3_WAIT)
            if suffix in got and 'method="GetObject"' in labels:
                got[suffix] += value
        return got["_sum"], got["_count"]

    if not before or not after:
        return None
    (s0, n0), (s1, n1) = totals(before), totals(after)
    if n1 - n0 <= 0:
        return None
    return round(1000 * (s1 - s0) / (n1 - n0), 3)


def _evict(store: Path, target: Target) -> None:
    """Delete the store's copy (if any) of a file S3 holds, so the next request is a miss."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.in_store(str(store), target.rel))


def _filling(store: Path, rel: str) -> bool:
    """Whether a fill of `rel` is running (its fill file exists until it is renamed in)."""
    return os.path.exists(store / paths.FILL_DIR / paths.fill_name(rel))


class _Evictions:
    """Misses: the store's copy is deleted before each request. When none of this run's
    requests for the file is in flight, a fill still finishing (an earlier answer's fsync
    and rename come after its last byte) is waited for first, else its rename would put the
    file back behind the eviction; with one in flight, the request joins that fill."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.in_flight: Counter[str] = Counter()

    @contextlib.asynccontextmanager
    async def miss(self, target: Target) -> AsyncIterator[None]:
        rel = target.rel
        if not self.in_flight[rel]:
            # another process's fill: nothing to wait on but its file, polled
            for _ in range(int(_FILL_SETTLE_S / _FILL_POLL_S)):
                if not _filling(self.store, rel):
                    break
                await asyncio.sleep(_FILL_POLL_S)
        self.in_flight[rel] += 1
        try:
            _evict(self.store, target)
            yield
        finally:
            self.in_flight[rel] -= 1


class _Live:
    """A progress line on a terminal, redrawn twice a second."""

    def __init__(self, stream: TextIO | None, started: float) -> None:
        self.stream, self.started, self.shown = stream, started, 0.0

    def update(self, results: Sequence[Result], force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self.shown < _PROGRESS_S):
            return
        self.shown = now
        elapsed = max(now - self.started, 1e-9)
        ok = [r for r in results if r.error is None]
        self.stream.write(
            f"\r\x1b[Kbench: {elapsed:.1f} s, {len(results)} requests, {len(ok) / elapsed:.0f}"
            f" ok/s, {sum(r.bytes for r in ok) / elapsed / 1e6:.1f} MB/s,"
            f" {len(results) - len(ok)} errors"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


async def _one(
    session: aiohttp.ClientSession,
    options: Options,
    planned: Planned,
    expected: frozenset[int],
    evictions: _Evictions | None,
) -> Result:
    if planned.miss:
        assert evictions is not None
        async with evictions.miss(planned.target):
            return await _request(session, options, planned, expected)
    return await _request(session, options, planned, expected)


async def _request(
    session: aiohttp.ClientSession, options: Options, planned: Planned, expected: frozenset[int]
) -> Result:
    t = planned.target
    url = t.url or options.url.rstrip("/") + request_path(t, options.api)
    headers = {"X-Request-ID": f"{options.request_id_prefix}-{planned.n}"}
    if options.token is not None and t.url is None:
        headers["Authorization"] = f"Bearer {options.token}"
    if planned.byte_range is not None:
        headers["Range"] = "bytes={}-{}".format(*planned.byte_range)
    hasher = hashlib.sha256() if planned.verify and t.sha256 and not planned.byte_range else None
    started = time.perf_counter()
    ttfb = 0.0
    received = 0
    status: int | None = None
    try:
        async with session.get(url, headers=headers) as resp:
            status = resp.status
            async for chunk in resp.content.iter_any():
                if not received:
                    ttfb = time.perf_counter() - started
                received += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
            content_range = resp.headers.get("Content-Range")
    except (aiohttp.ClientError, TimeoutError) as e:
        elapsed = time.perf_counter() - started
        cut = f"status_{status}_cut" if status is not None else f"no_answer_{type(e).__name__}"
        return Result(planned.n, planned.miss, status, cut, elapsed, ttfb, received, False)
    elapsed = time.perf_counter() - started
    if not received:
        ttfb = elapsed
    digest = hasher.hexdigest() if hasher is not None else None
    error = (
        verify(planned, status, content_range, received, digest)
        if status in expected
        else f"status_{status}"
    )
    return Result(
        planned.n, planned.miss, status, error, elapsed, ttfb, received, digest is not None
    )


async def run(options: Options, planner: Planner) -> dict[str, Any]:
    """Drive the load; return the report (see `summarize`). The library entry point."""
    if options.mode in ("miss", "mixed") and options.evict_store is None:
        raise BenchError("--evict-from: required in miss and mixed modes")
    if options.duration is None and options.requests is None:
        raise BenchError("--duration or --requests: one bound is required")
    expected = expected_statuses(options.mode)
    results: list[Result] = []
    counter = iter(range(sys.maxsize))
    connector = aiohttp.TCPConnector(limit=options.concurrency, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=options.timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
    ) as session:
        gets_before = await _scrape(session, options.metrics_url)
        started = time.monotonic()
        deadline = started + options.duration if options.duration is not None else math.inf
        live = _Live(options.progress, started)
        evictions = _Evictions(options.evict_store) if options.evict_store else None

        async def worker() -> None:
            while True:
                n = next(counter)
                if options.requests is not None and n >= options.requests:
                    return
                if options.rate is not None:
                    await asyncio.sleep(max(0.0, started + n / options.rate - time.monotonic()))
                if time.monotonic() >= deadline:
                    return
                planned = planner.plan(n)
                results.append(await _one(session, options, planned, expected, evictions))
                live.update(results)

        await asyncio.gather(*(worker() for _ in range(options.concurrency)))
        elapsed = time.monotonic() - started
        live.close()
        gets_after = await _scrape(session, options.metrics_url)
    s3_gets = s3_gets_between(gets_before, gets_after)
    results.sort(key=lambda r: r.n)
    return summarize(
        results,
        elapsed,
        s3_gets=s3_gets,
        s3_wait_ms=s3_get_wait_ms(gets_before, gets_after),
        extra={
            "mode": options.mode,
            "url": options.url,
            "concurrency": options.concurrency,
            "request_id_prefix": options.request_id_prefix,
            "targets": len(planner.targets),
        },
    )


async def _query(config: Config, sql: str, args: Sequence[Any]) -> list[Sequence[Any]]:
    """Rows of one read-only query on Synapse's database."""
    import sqlite3

    import aiosqlite
    import asyncpg

    from media_proxy.metadata import _asyncpg_args

    db = config.database
    try:
        if db.engine == "sqlite3":
            # Read-only: the bench must never take a write lock Synapse would wait on.
            uri = "file:" + urllib.request.pathname2url(str(db.args["database"])) + "?mode=ro"
            async with aiosqlite.connect(uri, uri=True) as conn, conn.execute(sql, args) as cur:
                return list(await cur.fetchall())
        pg = await asyncpg.connect(**_asyncpg_args(dict(db.args)))
        try:
            return list(await pg.fetch(sql, *args))
        finally:
            await pg.close()
    except (OSError, sqlite3.Error, asyncpg.PostgresError) as e:
        raise BenchError(f"database ({db.engine}): {e}") from None


async def sample_targets(
    config: Config,
    n: int,
    *,
    thumbnails: bool = False,
    kind: str | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> list[Target]:
    """`n` random local media (or thumbnails) from Synapse's database."""
    sql, args = sample_sql(
        thumbnails=thumbnails,
        kind=kind,
        min_size=min_size,
        max_size=max_size,
        limit=n,
        postgres=config.database.engine != "sqlite3",
    )
    rows = await _query(config, sql, args)
    return [target_from_row(config.server_name, r, thumbnails=thumbnails) for r in rows]


async def enrich(config: Config, pairs: Sequence[tuple[str, str]]) -> list[Target]:
    """Targets for listed URIs, with the database's type, length and sha256 for local ones."""
    local = sorted({m for s, m in pairs if s == config.server_name})
    rows: dict[str, Sequence[Any]] = {}
    postgres = config.database.engine != "sqlite3"
    for i in range(0, len(local), 500):
        batch = local[i : i + 500]
        sql = (
            "SELECT m.media_id, m.media_type, m.media_length, m.sha256"
            f" FROM local_media_repository AS m WHERE m.media_id IN ({','.join('?' * len(batch))})"
        )
        for r in await _query(config, _numbered(sql) if postgres else sql, batch):
            rows[r[0]] = r
    out = []
    for server, media_id in pairs:
        row = rows.get(media_id) if server == config.server_name else None
        out.append(
            Target(server, media_id, row[2], row[3], row[1]) if row else Target(server, media_id)
        )
    return out


async def miss_targets(
    config: Config, targets: Sequence[Target]
) -> tuple[list[Target], Counter[str]]:
    """The targets that may be evicted: local, of known length, held by S3 with that length.
    Returns them and the others counted by reason."""
    from media_proxy.s3 import S3, S3Error

    if config.s3 is None:
        raise BenchError("miss mode: no S3 storage provider in the Synapse config (or s3: key)")
    skipped: Counter[str] = Counter()
    eligible: list[Target] = []
    s3 = S3(config.s3)
    await s3.start()
    try:
        seen: dict[str, int | None] = {}
        for t in targets:
            if t.server_name != config.server_name or t.thumb is not None:
                skipped["not_local_media"] += 1
                continue
            if t.length is None:
                skipped["length_unknown"] += 1
                continue
            if t.media_id not in seen:
                seen[t.media_id] = await s3.size(t.rel)
            size = seen[t.media_id]
            if size is None:
                skipped["not_in_s3"] += 1
            elif size != t.length:
                skipped["size_differs_in_s3"] += 1
            else:
                eligible.append(t)
    except S3Error as e:
        raise BenchError(f"S3: {e}") from None
    finally:
        await s3.close()
    return eligible, skipped


# --- the command --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench flags (the configuration flags are the CLI's shared ones)."""
    parser.add_argument("mode", choices=MODES, help="what to measure")
    parser.add_argument("--url", required=True, help="base URL: media-proxy, nginx or Synapse")
    parser.add_argument(
        "--token", help="access token (default: $MEDIA_PROXY_BENCH_TOKEN; keeps it off ps)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sample", help="N random media from Synapse's database")
    source.add_argument("--uris", type=Path, help="a file of mxc:// URIs, one a line")
    parser.add_argument("--kind", choices=KINDS, help="sample only this kind (MIME major type)")
    parser.add_argument("--min-size", help="sample only files at least SIZE (e.g. 1M)")
    parser.add_argument("--max-size", help="sample only files at most SIZE")
    parser.add_argument(
        "--duration", default="10s", help="run this long (default 10s; 0: no limit)"
    )
    parser.add_argument("--requests", help="stop after N requests")
    parser.add_argument("--concurrency", default="8", help="requests in flight (default 8)")
    parser.add_argument("--rate", help="send at most R requests per second")
    parser.add_argument("--miss-ratio", default="0.1", help="mixed mode: share of misses")
    parser.add_argument(
        "--evict-from", type=Path, help="miss/mixed: the store path (must be the configured store)"
    )
    parser.add_argument(
        "--verify-ratio", default="0.1", help="share of bodies hashed against the DB's sha256"
    )
    parser.add_argument("--range-size", default="1M", help="ranges mode: bytes per request")
    parser.add_argument(
        "--api",
        choices=("client", "legacy", "store"),
        default="client",
        help="client (/_matrix/client/v1/media), legacy (/_matrix/media/v3), or store"
        " (URL + the store path: a static server over the media store)",
    )
    parser.add_argument("--metrics-url", help="the proxy's Prometheus endpoint, for S3 GETs")
    parser.add_argument("--seed", help="random seed (same seed, same requests)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def _number(flag: str, value: str | None, kind: Callable[[str], float], low: float) -> Any:
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number < low:
        raise BenchError(f"{flag}: expected a number >= {low:g}, got {value!r}")
    return number


def _config(args: argparse.Namespace, needed: bool) -> Config | None:
    synapse_config = getattr(args, "synapse_config", None) or []
    config_file = getattr(args, "config", None)
    if not synapse_config and config_file is None:
        if needed:
            raise BenchError("--synapse-config: required to sample media or to evict")
        return None
    return load(
        config_file=config_file,
        synapse_config=synapse_config,
        overrides={"cache_path": getattr(args, "cache_path", None)},
        need_synapse_url=False,
    )


async def _command(args: argparse.Namespace, out: TextIO) -> int:
    mode: Mode = args.mode
    sample = _number("--sample", args.sample, int, 1)
    evict_from: Path | None = args.evict_from
    config = _config(args, needed=sample is not None or mode in ("miss", "mixed"))
    store = check_evict_from(evict_from, config.cache_path if config else None, mode)
    kind = args.kind or ("video" if mode == "ranges" and sample is not None else None)
    size = {
        k: parse_size(v, source="command line", key=f"--{k.replace('_', '-')}")
        for k, v in (("min_size", args.min_size), ("max_size", args.max_size))
        if v is not None
    }
    if sample is not None:
        assert config is not None
        targets = await sample_targets(
            config, sample, thumbnails=mode == "thumbnails", kind=kind, **size
        )
        if not targets:
            raise BenchError("--sample: no media in the database matches")
    else:
        try:
            text = args.uris.read_text()
        except OSError as e:
            raise BenchError(f"--uris: cannot read {args.uris}: {e.strerror}") from None
        pairs = parse_uris(text, source=str(args.uris))
        targets = await enrich(config, pairs) if config is not None else [Target(*p) for p in pairs]
        if mode == "thumbnails":
            raise BenchError("thumbnails mode: use --sample (thumbnail sizes come from the DB)")
    if mode == "thumbnails" and args.api == "store":
        raise BenchError("--api store: serves originals only, not thumbnails")
    eligible: list[Target] = []
    if mode in ("miss", "mixed"):
        assert config is not None
        eligible, skipped = await miss_targets(config, targets)
        if skipped and not args.json:
            print("not evictable: " + ", ".join(f"{k} {v}" for k, v in skipped.items()), file=out)
    duration = parse_duration(args.duration, source="command line", key="--duration") or None
    options = Options(
        url=args.url,
        mode=mode,
        token=args.token or os.environ.get("MEDIA_PROXY_BENCH_TOKEN"),
        api=args.api,
        concurrency=_number("--concurrency", args.concurrency, int, 1),
        duration=duration,
        requests=_number("--requests", args.requests, int, 1),
        rate=_number("--rate", args.rate, float, 0.001),
        miss_ratio=_number("--miss-ratio", args.miss_ratio, float, 0),
        verify_ratio=_number("--verify-ratio", args.verify_ratio, float, 0),
        range_span=parse_size(args.range_size, source="command line", key="--range-size") or 1,
        seed=_number("--seed", args.seed, int, 0),
        evict_store=store,
        metrics_url=args.metrics_url,
        progress=sys.stderr if sys.stderr.isatty() and not args.json else None,
    )
    planner = Planner(
        mode,
        targets,
        eligible,
        miss_ratio=min(options.miss_ratio, 1.0),
        verify_ratio=min(options.verify_ratio, 1.0),
        range_span=options.range_span,
        seed=options.seed,
    )
    report = await run(options, planner)
    print(json.dumps(report, sort_keys=True) if args.json else format_report(report), file=out)
    return 0 if report["ok"] == report["requests"] else 1


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`media-proxy bench`: exit 0 when every answer verified, 1 otherwise, 2 on bad input."""
    try:
        return asyncio.run(_command(args, out or sys.stdout))
    except (BenchError, ConfigError) as e:
        print(f"media-proxy: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
