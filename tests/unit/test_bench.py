"""bench.py: percentiles, sampling, request planning, verification, the refusal to evict
without being told the store, and the driver against a small local HTTP server (which
answers what each test needs: right bytes, wrong bytes, whether the file was in the store)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import random
import sqlite3
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from media_proxy import bench, cli, paths
from media_proxy.bench import (
    BenchError,
    Options,
    Planned,
    Planner,
    Result,
    Target,
    Thumb,
    check_evict_from,
    latency_summary,
    parse_prometheus,
    parse_uris,
    percentile,
    s3_get_count,
    sample_sql,
    seek_range,
    summarize,
    verify,
)
from media_proxy.config import Config, DatabaseConfig

SERVER = "example.org"
BODY = b"0123456789" * 100
SHA = hashlib.sha256(BODY).hexdigest()


def target(media_id: str = "abcdefgh", **kw: Any) -> Target:
    return Target(SERVER, media_id, **{"length": len(BODY), "sha256": SHA, **kw})


# --- percentiles -------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert [percentile(values, q) for q in (50, 90, 99, 100)] == [50, 90, 99, 100]
    assert percentile([0.5], 99) == 0.5
    assert percentile([], 50) == 0.0
    # 10 samples: p99 is the slowest one, p50 the fifth, never an interpolation.
    ten = [float(v) for v in range(10)]
    assert percentile(ten, 99) == 9.0
    assert percentile(ten, 50) == 4.0
    assert percentile(ten, 0) == 0.0


def test_latency_summary_is_in_milliseconds() -> None:
    summary = latency_summary([0.003, 0.001, 0.002])
    assert summary == {"p50": 2.0, "p90": 3.0, "p99": 3.0, "max": 3.0}
    assert latency_summary([]) == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}


# --- sampling ------------------------------------------------------------------------------


def test_parse_uris_skips_comments_and_names_bad_lines() -> None:
    text = "# media\n\nmxc://example.org/abcdef\n  mxc://other.org/xyz123  \n"
    assert parse_uris(text, source="f") == [("example.org", "abcdef"), ("other.org", "xyz123")]
    with pytest.raises(BenchError, match=r"^f:2: not an mxc URI"):
        parse_uris("mxc://example.org/ok\nhttp://example.org/x\n", source="f")
    with pytest.raises(BenchError, match="f:1"):
        parse_uris("mxc://example.org/../etc\n", source="f")
    with pytest.raises(BenchError, match="no mxc"):
        parse_uris("# nothing\n", source="f")


def _media_db(path: Path) -> Path:
    """The columns of Synapse's media tables the sampler reads, with one row per case."""
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE local_media_repository (media_id TEXT, media_type TEXT,
            media_length INTEGER, created_ts BIGINT, upload_name TEXT, user_id TEXT,
            quarantined_by TEXT, url_cache TEXT, last_access_ts BIGINT, safe_from_quarantine
            BOOLEAN, authenticated BOOLEAN, sha256 TEXT);
        CREATE TABLE local_media_repository_thumbnails (media_id TEXT, thumbnail_width INTEGER,
            thumbnail_height INTEGER, thumbnail_type TEXT, thumbnail_method TEXT,
            thumbnail_length INTEGER);
        """
    )
    rows = [
        ("img_small", "image/png", 1000, None, None, "aa"),
        ("img_big", "image/jpeg", 5_000_000, None, None, "bb"),
        ("vid", "video/mp4", 20_000_000, None, None, "cc"),
        ("snd", "audio/ogg", 3000, None, None, None),
        ("doc", "application/pdf", 2000, None, None, None),
        ("untyped", None, 10, None, None, None),
        ("quarantined", "image/png", 1000, "@admin:example.org", None, None),
        ("preview", "image/png", 1000, None, "https://example.com", None),
        ("pending", "image/png", None, None, None, None),
    ]
    conn.executemany(
        "INSERT INTO local_media_repository (media_id, media_type, media_length,"
        " quarantined_by, url_cache, sha256, created_ts) VALUES (?, ?, ?, ?, ?, ?, 0)",
        rows,
    )
    conn.executemany(
        "INSERT INTO local_media_repository_thumbnails VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("img_big", 32, 32, "image/jpeg", "crop", 900),
            ("img_big", 640, 480, "image/jpeg", "scale", 40_000),
            ("quarantined", 32, 32, "image/png", "crop", 800),
        ],
    )
    conn.commit()
    conn.close()
    return path


def _ids(db: Path, **kw: Any) -> list[str]:
    sql, args = sample_sql(postgres=False, **{"limit": 100, "thumbnails": False, **kw})
    with sqlite3.connect(db) as conn:
        return sorted(r[0] for r in conn.execute(sql, args))


def test_sample_sql_filters_by_kind_and_size_and_skips_unusable_media(tmp_path: Path) -> None:
    db = _media_db(tmp_path / "homeserver.db")
    usable = ["doc", "img_big", "img_small", "snd", "untyped", "vid"]
    assert _ids(db, kind=None, min_size=None, max_size=None) == usable
    assert _ids(db, kind="image", min_size=None, max_size=None) == ["img_big", "img_small"]
    assert _ids(db, kind="video", min_size=None, max_size=None) == ["vid"]
    assert _ids(db, kind="other", min_size=None, max_size=None) == ["doc", "untyped"]
    assert _ids(db, kind=None, min_size=1500, max_size=4000) == ["doc", "snd"]
    assert _ids(db, kind=None, min_size=None, max_size=None, limit=2) != []
    assert len(_ids(db, kind=None, min_size=None, max_size=None, limit=2)) == 2
    thumbs = _ids(db, kind=None, min_size=1000, max_size=None, thumbnails=True)
    assert thumbs == ["img_big"]  # the 640x480 one; the quarantined media's never
    with pytest.raises(BenchError, match="--kind"):
        _ids(db, kind="font", min_size=None, max_size=None)


def test_sample_sql_numbers_placeholders_for_postgres() -> None:
    sql, args = sample_sql(
        thumbnails=False, kind="image", min_size=1, max_size=2, limit=5, postgres=True
    )
    assert "?" not in sql
    assert "$1" in sql and "$4" in sql and "$5" not in sql
    assert args == ["image/%", 1, 2, 5]


async def test_sample_targets_reads_synapses_database(tmp_path: Path) -> None:
    config = _config(tmp_path, _media_db(tmp_path / "homeserver.db"))
    targets = await bench.sample_targets(config, 10, kind="image", min_size=2000)
    assert targets == [Target(SERVER, "img_big", 5_000_000, "bb", "image/jpeg")]
    thumbs = await bench.sample_targets(config, 10, thumbnails=True, max_size=1000)
    assert [t.thumb for t in thumbs] == [Thumb(32, 32, "crop", 900)]
    listed = await bench.enrich(config, [(SERVER, "vid"), (SERVER, "gone"), ("x.org", "vid")])
    assert listed == [
        Target(SERVER, "vid", 20_000_000, "cc", "video/mp4"),
        Target(SERVER, "gone"),
        Target("x.org", "vid"),
    ]


def _config(tmp_path: Path, db: Path) -> Config:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return Config(
        server_name=SERVER,
        media_store_path=store,
        cache_path=store,
        database=DatabaseConfig("sqlite3", {"database": str(db)}),
        synapse_url="http://127.0.0.1:1",
    )


# --- planning ------------------------------------------------------------------------------


def test_planner_is_deterministic_for_a_seed_and_covers_every_target_first() -> None:
    targets = [target(f"media{i:04}") for i in range(5)]

    def plans(seed: int) -> list[Planned]:
        p = Planner("hit", targets, seed=seed, verify_ratio=0.5)
        return [p.plan(n) for n in range(50)]

    assert plans(1) == plans(1)
    assert [p.target for p in plans(1)[:5]] == targets
    assert any(p.verify for p in plans(1)) and not all(p.verify for p in plans(1))
    assert not any(p.miss for p in plans(1))


def test_planner_misses_come_from_the_evictable_targets_only() -> None:
    all_targets = [target(f"media{i:04}") for i in range(4)]
    evictable = all_targets[:1]
    miss = Planner("miss", all_targets, evictable, seed=3)
    assert all(p.miss and p.target == evictable[0] for p in map(miss.plan, range(20)))
    mixed = Planner("mixed", all_targets, evictable, miss_ratio=0.25, seed=3)
    planned = [mixed.plan(n) for n in range(400)]
    misses = [p for p in planned if p.miss]
    assert all(p.target == evictable[0] for p in misses)
    assert 50 < len(misses) < 150  # 25% of 400, for this seed
    with pytest.raises(BenchError, match="S3 holds none"):
        Planner("miss", all_targets, [])
    with pytest.raises(BenchError, match="no media"):
        Planner("hit", [])


def test_ranges_are_seeks_within_the_file() -> None:
    rng = random.Random(5)
    for _ in range(200):
        start, end = seek_range(5000, 1024, rng)
        assert 0 <= start <= end < 5000 and end - start < 1024
    assert seek_range(None, 100, rng) == (0, 99)
    planner = Planner("ranges", [target(length=10_000)], range_span=100, seed=1)
    assert all(p.byte_range is not None for p in map(planner.plan, range(10)))


def test_request_paths() -> None:
    t = target("abcdefgh")
    assert bench.request_path(t, "client") == (
        "/_matrix/client/v1/media/download/example.org/abcdefgh"
    )
    assert bench.request_path(t, "legacy") == "/_matrix/media/v3/download/example.org/abcdefgh"
    assert bench.request_path(t, "store") == "/local_content/ab/cd/efgh"
    thumb = target("abcdefgh", thumb=Thumb(32, 24, "crop", 900))
    assert bench.request_path(thumb, "client") == (
        "/_matrix/client/v1/media/thumbnail/example.org/abcdefgh?width=32&height=24&method=crop"
    )


# --- verification --------------------------------------------------------------------------


def test_verify_counts_a_wrong_body_as_an_error() -> None:
    t = target()
    full = Planned(0, t, verify=True)
    assert verify(full, 200, None, len(BODY), SHA) is None
    assert verify(full, 200, None, len(BODY), None) is None  # not hashed: length only
    assert verify(full, 200, None, len(BODY) - 1, None) == "wrong_length"
    assert verify(full, 200, None, len(BODY), "0" * 64) == "wrong_sha256"
    assert verify(full, 200, None, len(BODY), SHA.upper().lower()) is None
    unknown = Planned(0, Target(SERVER, "abcdef"))
    assert verify(unknown, 200, None, 5, "ff" * 32) is None  # nothing known to compare
    thumb = Planned(0, target(thumb=Thumb(32, 32, "crop", 900)))
    assert verify(thumb, 200, None, 123, None) is None
    assert verify(thumb, 200, None, 0, None) == "empty_thumbnail"


def test_verify_ranges() -> None:
    t = target()  # 1000 bytes
    ranged = Planned(0, t, byte_range=(100, 199))
    assert verify(ranged, 206, "bytes 100-199/1000", 100, None) is None
    assert verify(ranged, 206, "bytes 100-199/1001", 100, None) == "wrong_length"
    assert verify(ranged, 206, "bytes 0-99/1000", 100, None) == "wrong_range"
    assert verify(ranged, 206, "bytes 100-199/1000", 99, None) == "wrong_length"
    assert verify(ranged, 206, None, 100, None) == "bad_content_range"
    tail = Planned(0, t, byte_range=(900, 1999))
    assert verify(tail, 206, "bytes 900-999/1000", 100, None) is None
    assert verify(ranged, 200, None, 1000, None) is None  # Range ignored: the whole file
    assert bench.expected_range((1000, 1010), 1000) is None
    # length unknown (a listed URI without the database): the server's total decides
    short = Planned(0, Target(SERVER, "abcdef"), byte_range=(0, 1023))
    assert verify(short, 206, "bytes 0-99/100", 100, None) is None
    assert verify(short, 206, "bytes 0-1023/*", 1024, None) is None
    assert verify(short, 206, "bytes 0-99/*", 100, None) == "wrong_range"


def test_summary_counts_only_verified_answers_as_successes() -> None:
    results = [
        Result(0, False, 200, None, 0.010, 0.005, 1000, True),
        Result(1, False, 200, "wrong_length", 0.001, 0.001, 10, False),
        Result(2, True, 200, None, 0.030, 0.020, 1000, False),
        Result(3, False, 404, "status_404", 0.002, 0.002, 50, False),
        Result(4, False, None, "no_answer_ClientOSError", 0.002, 0.0, 0, False),
    ]
    report = summarize(results, 2.0, s3_gets=None)
    assert report["requests"] == 5 and report["ok"] == 2
    assert report["requests_per_s"] == 1.0
    assert report["bytes"] == 2000
    assert report["statuses"] == {"200": 3, "404": 1, "none": 1}
    assert report["errors"] == {
        "no_answer_ClientOSError": 1,
        "status_404": 1,
        "wrong_length": 1,
    }
    assert report["latency_ms"]["max"] == 30.0
    assert report["s3_gets"] == "unknown"
    assert report["hit"]["requests"] == 1 and report["miss"]["ttfb_ms"]["p50"] == 20.0
    assert summarize(results, 2.0, s3_gets=3.0)["s3_gets"] == 3
    assert "S3 GETs:  unknown" in bench.format_report(report)


def test_s3_gets_from_prometheus_metrics() -> None:
    page = textwrap.dedent(
        """
        # HELP media_proxy_s3_requests_total S3 calls
        # TYPE media_proxy_s3_requests_total counter
        media_proxy_s3_requests_total{operation="GetObject"} 7
        media_proxy_s3_requests_total{operation="HeadObject"} 3
        media_proxy_requests_total{source="s3"} 40
        """
    )
    assert s3_get_count(parse_prometheus(page)) == 7
    # media-proxy's own names (README, Metrics): every GetObject outcome counts, HEADs do not
    ours = textwrap.dedent(
        """
        # TYPE media_proxy_s3_requests_total counter
        media_proxy_s3_requests_total{method="GetObject",outcome="ok"} 5.0
        media_proxy_s3_requests_total{method="GetObject",outcome="not_found"} 1.0
        media_proxy_s3_requests_total{method="HeadObject",outcome="ok"} 9.0
        media_proxy_s3_request_duration_seconds_count{method="GetObject"} 6.0
        media_proxy_s3_request_duration_seconds_bucket{le="0.1",method="GetObject"} 6.0
        media_proxy_fills_started_total 5.0
        """
    )
    assert s3_get_count(parse_prometheus(ours)) == 6
    fresh = parse_prometheus("media_proxy_fills_started_total 0.0\n")
    assert bench.s3_gets_between(fresh, parse_prometheus(ours)) == 6  # first GETs of the run
    assert bench.s3_gets_between(parse_prometheus(ours), parse_prometheus(ours)) == 0
    assert bench.s3_gets_between([], parse_prometheus(ours)) is None  # no page: unknown
    assert bench.s3_gets_between(fresh, fresh) is None  # no such counter: unknown
    histogram = (
        'media_proxy_s3_get_seconds_bucket{le="0.1"} 4\n'
        "media_proxy_s3_get_seconds_sum 0.3\n"
        "media_proxy_s3_get_seconds_count 5\n"
    )
    assert s3_get_count(parse_prometheus(histogram)) == 5
    assert s3_get_count(parse_prometheus("media_proxy_s3_gets_total 2\n")) == 2
    assert s3_get_count(parse_prometheus("process_resident_memory_bytes 1e6\n")) is None


def test_s3_wait_is_the_mean_of_the_gets_between_two_scrapes() -> None:
    def page(get_sum: float, get_count: int, head_sum: float) -> list[tuple[str, str, float]]:
        return parse_prometheus(
            f'media_proxy_s3_request_duration_seconds_sum{{method="GetObject"}} {get_sum}\n'
            f'media_proxy_s3_request_duration_seconds_count{{method="GetObject"}} {get_count}\n'
            f'media_proxy_s3_request_duration_seconds_sum{{method="HeadObject"}} {head_sum}\n'
            'media_proxy_s3_request_duration_seconds_count{method="HeadObject"} 50\n'
            'media_proxy_s3_request_duration_seconds_bucket{le="0.1",method="GetObject"} 9\n'
        )

    # the run's GETs only (earlier ones and HEADs never count): 0.03 s over 20 GETs
    assert bench.s3_get_wait_ms(page(1.0, 10, 5.0), page(1.03, 30, 9.0)) == 1.5
    fresh = parse_prometheus("media_proxy_fills_started_total 0.0\n")
    assert bench.s3_get_wait_ms(fresh, page(0.02, 10, 0.0)) == 2.0  # the run's first GETs
    assert bench.s3_get_wait_ms([], page(1.0, 10, 0.0)) is None  # no first page: unknown
    assert bench.s3_get_wait_ms(page(1.0, 10, 0.0), page(1.0, 10, 3.0)) is None  # no GET
    assert bench.s3_get_wait_ms(page(1.0, 10, 0.0), []) is None  # no page: unknown
    report = summarize(
        [Result(0, True, 200, None, 0.01, 0.004, 10, False)], 1.0, s3_gets=1.0, s3_wait_ms=1.5
    )
    assert "S3 answered in 1.5 ms on average" in bench.format_report(report)
    assert "s3_get_wait_ms" not in summarize([], 1.0, s3_gets=None)


# --- the refusal to evict, and eviction ----------------------------------------------------


def test_evict_from_must_name_the_configured_store(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "link").symlink_to(store)
    assert check_evict_from(None, store, "hit") is None
    assert check_evict_from(tmp_path / "link", store, "miss") == store.resolve()
    assert check_evict_from(store, store, "mixed") == store.resolve()
    with pytest.raises(BenchError, match=r"^--evict-from: required in miss mode"):
        check_evict_from(None, store, "miss")
    with pytest.raises(BenchError, match="is not the configured store"):
        check_evict_from(tmp_path, store, "miss")
    with pytest.raises(BenchError, match="needs --synapse-config"):
        check_evict_from(store, None, "mixed")
    with pytest.raises(BenchError, match="only miss and mixed"):
        check_evict_from(store, store, "hit")


def _homeserver(tmp_path: Path, db: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    hs = tmp_path / "homeserver.yaml"
    hs.write_text(
        f"server_name: {SERVER}\nmedia_store_path: {store}\n"
        f"database: {{name: sqlite3, args: {{database: {db}}}}}\n"
    )
    return hs


def test_the_command_refuses_to_evict_without_the_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hs = _homeserver(tmp_path, _media_db(tmp_path / "homeserver.db"))
    kept = tmp_path / "store" / paths.local_media("img_small")
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"x" * 1000)
    base = ["bench", "miss", "--url", "http://127.0.0.1:9", "--sample", "5"]
    for extra, message in [
        ([], "--evict-from: required in miss mode"),
        (["--evict-from", str(tmp_path)], "is not the configured store"),
    ]:
        assert cli.main([*base, "--synapse-config", str(hs), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("media-proxy: --evict-from: "), err
        assert message in err and err.count("\n") == 1
    assert cli.main(base) == 2
    assert "--synapse-config: required" in capsys.readouterr().err
    assert kept.read_bytes() == b"x" * 1000


def test_the_command_names_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uris = tmp_path / "uris"
    uris.write_text("mxc://example.org/abcdef\n")
    base = ["bench", "hit", "--url", "http://127.0.0.1:9", "--uris", str(uris)]
    for flags, name in [
        (["--concurrency", "0"], "--concurrency"),
        (["--rate", "fast"], "--rate"),
        (["--duration", "soon"], "--duration"),
        (["--evict-from", str(tmp_path)], "--evict-from"),
    ]:
        assert cli.main([*base, *flags]) == 2
        assert name in capsys.readouterr().err
    assert cli.main([*base[:4], "--uris", str(tmp_path / "none")]) == 2
    assert "--uris: cannot read" in capsys.readouterr().err


# --- the driver, against a small local server ----------------------------------------------


class Origin:
    """Serves `/_matrix/client/v1/media/download/SERVER/ID` with `BODY` (or `wrong` for ids
    starting with "wrong"), records each request's id, and whether the file was in `store`."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.seen: list[tuple[str, bool, str | None]] = []
        self.media: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        media_id = request.match_info["media_id"]
        in_store = (self.store / paths.local_media(media_id)).exists()
        self.seen.append((request.headers["X-Request-ID"], in_store, request.headers.get("Range")))
        self.media.append(media_id)
        if request.headers.get("Authorization") != "Bearer tok":
            return web.json_response({"errcode": "M_MISSING_TOKEN"}, status=401)
        body = BODY[:-1] + b"!" if media_id.startswith("wrong") else BODY
        rng = request.headers.get("Range")
        if rng is not None:
            start, end = (int(v) for v in rng.removeprefix("bytes=").split("-"))
            end = min(end, len(body) - 1)
            return web.Response(
                status=206,
                body=body[start : end + 1],
                headers={"Content-Range": f"bytes {start}-{end}/{len(body)}"},
            )
        return web.Response(body=body)


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[tuple[str, Origin]]:
    served = Origin(tmp_path / "store")
    app = web.Application()
    app.router.add_get("/_matrix/client/v1/media/download/{server}/{media_id}", served.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", served
    finally:
        await runner.cleanup()


async def test_run_counts_requests_and_keys_them_by_request_id(
    origin: tuple[str, Origin],
) -> None:
    url, served = origin
    options = Options(url=url, token="tok", concurrency=4, duration=None, requests=40)
    planner = Planner("hit", [target("goodmedia"), target("wrongmedia")], verify_ratio=1.0)
    report = await bench.run(options, planner)
    assert report["requests"] == 40
    wrong = sum(m.startswith("wrong") for m in served.media)
    assert 0 < wrong < 40
    assert report["ok"] == 40 - wrong and report["errors"] == {"wrong_sha256": wrong}
    assert report["statuses"] == {"200": 40}
    assert report["verified_sha256"] == 40 - wrong
    ids = sorted(rid for rid, _, _ in served.seen)
    assert ids == sorted(f"{options.request_id_prefix}-{n}" for n in range(40))
    json.dumps(report)  # machine-readable as it is


async def test_miss_mode_evicts_each_file_before_its_request(
    origin: tuple[str, Origin], tmp_path: Path
) -> None:
    url, served = origin
    store = tmp_path / "store"
    files = [store / paths.local_media(m) for m in ("missmedia1", "missmedia2")]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(BODY)
    other = store / paths.local_media("untouched")
    other.parent.mkdir(parents=True, exist_ok=True)
    other.write_bytes(BODY)
    targets = [target("missmedia1"), target("missmedia2"), target("untouched")]
    options = Options(
        url=url, mode="miss", token="tok", concurrency=1, duration=None, requests=6,
        evict_store=store,
    )  # fmt: skip
    report = await bench.run(options, Planner("miss", targets, targets[:2]))
    assert report["ok"] == 6 and report["misses"] == 6
    assert [in_store for _, in_store, _ in served.seen] == [False] * 6
    assert not any(f.exists() for f in files) and other.exists()
    with pytest.raises(BenchError, match="--evict-from"):
        await bench.run(
            Options(url=url, mode="miss", requests=1), Planner("miss", targets, targets[:2])
        )


async def test_a_miss_waits_for_a_fill_finishing_before_evicting(
    origin: tuple[str, Origin], tmp_path: Path
) -> None:
    """A fill outliving its answer (fsync, rename) would put the file back after the next
    eviction: the bench waits for its fill file to be renamed in, then evicts."""
    url, served = origin
    store = tmp_path / "store"
    t = target("fillingmedia")
    fill = store / paths.FILL_DIR / paths.fill_name(t.rel)
    fill.parent.mkdir(parents=True)
    fill.write_bytes(BODY)
    final = store / t.rel
    final.parent.mkdir(parents=True)
    options = Options(url=url, mode="miss", token="tok", duration=None, requests=1,
                      evict_store=store)  # fmt: skip
    task = asyncio.create_task(bench.run(options, Planner("miss", [t], [t])))
    await asyncio.sleep(0.1)
    assert served.seen == []  # still waiting on the fill
    fill.rename(final)  # the fill completes: the file is back in the store
    report = await task
    assert report["ok"] == 1
    assert [in_store for _, in_store, _ in served.seen] == [False]  # evicted after the rename


async def test_ranges_and_errors_by_status(origin: tuple[str, Origin]) -> None:
    url, served = origin
    ranges = Options(url=url, mode="ranges", token="tok", duration=None, requests=10)
    report = await bench.run(ranges, Planner("ranges", [target()], range_span=64, seed=2))
    assert report["ok"] == 10 and report["statuses"] == {"206": 10}
    assert all(r is not None and r.startswith("bytes=") for _, _, r in served.seen)
    terminal = io.StringIO()
    unauthorized = Options(url=url, token="bad", duration=None, requests=3, progress=terminal)
    report = await bench.run(unauthorized, Planner("hit", [target()]))
    assert report["ok"] == 0 and report["errors"] == {"status_401": 3}
    # the progress line is redrawn in place and erased at the end
    assert terminal.getvalue().startswith("\r\x1b[Kbench: ")
    assert "1 errors" in terminal.getvalue() and terminal.getvalue().endswith("\r\x1b[K")


async def test_the_command_prints_json(
    origin: tuple[str, Origin], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = origin
    uris = tmp_path / "uris"
    uris.write_text("mxc://example.org/goodmedia\n")
    monkeypatch.setenv("MEDIA_PROXY_BENCH_TOKEN", "tok")
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "hit", "--url", url, "--uris", str(uris)])
    args.requests, args.json = "5", True
    assert isinstance(args, argparse.Namespace)
    out = io.StringIO()
    assert await bench._command(args, out) == 0
    report = json.loads(out.getvalue())
    assert report["ok"] == 5 and report["s3_gets"] == "unknown"
