"""The cache commands' cost follows the work, on a store of a few thousand files (real SeaweedFS
behind the fault proxy, which counts S3 requests; Synapse's own schema on SQLite and
PostgreSQL, rows inserted directly): `cache status` and `cache upload --dry-run` join the store
with ListObjectsV2 pages and make no HeadObject; an eviction takes files in the database's
recency order and makes one HeadObject per file it considers, none for the rest."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import sqlite3
import string
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from devstack.postgres import Postgres
from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import PostgresDatabase, SqliteDatabase, Synapse
from media_proxy import paths
from media_proxy.config import load
from media_proxy.evict import BACKGROUND_MAX_FILES, ROUND_FILES, Evictor, Rules, store_bytes
from media_proxy.inventory import RANGE_KEYS, CachedFile, chunks, walk
from media_proxy.metadata import Database, open_database
from media_proxy.progress import Summary
from media_proxy.s3 import S3
from tests.faults import FaultProxy

pytestmark = pytest.mark.integration

N = 4000  # local media, 500 bytes each: two chunks of the walk, four listing pages
SIZE = 500
DAY_MS = 86_400_000
OLD = time.time() - 3 * 86400
REMOTE = "remote.test"
REMOTE_OLDEST = 3  # remote media older than every local one, each with a thumbnail
NOT_IN_S3 = 30  # among the newest half
OTHER_SIZE = 20


def rid(rng: random.Random, n: int = 24) -> str:
    return "".join(rng.choices(string.ascii_letters, k=n))


@dataclass
class Store:
    seaweed: SeaweedFS
    synapse: Synapse
    proxy: FaultProxy
    config: Path
    local: list[tuple[str, int]]  # (media_id, last_access_ts), oldest first
    remote: list[tuple[str, str]]  # (store path of the original, of its thumbnail), oldest first
    missing: set[str]
    other_size: set[str]
    with_sha256: set[str]

    @property
    def root(self) -> Path:
        return self.synapse.media_store_path

    def cli(self, *args: str) -> tuple[dict[str, Any], str]:
        argv = [sys.executable, "-m", "media_proxy", "cache", *args]
        argv += ["--synapse-config", str(self.synapse.config_path), "--config", str(self.config)]
        argv += ["--log-format", "json", "--json"]
        self.proxy.reset()
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
        lines = result.stdout.splitlines()
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary, "\n".join(lines[:-1])

    def heads(self) -> list[str]:
        prefix = f"/{self.seaweed_bucket}/"
        return [r.path.removeprefix(prefix) for r in self.proxy.requests if r.method == "HEAD"]

    def lists(self) -> int:
        return sum(1 for r in self.proxy.requests if "list-type=2" in r.path)

    def gets(self) -> list[str]:
        prefix = f"/{self.seaweed_bucket}/"
        return [
            r.path.removeprefix(prefix)
            for r in self.proxy.requests
            if r.method == "GET" and "list-type=2" not in r.path
        ]

    seaweed_bucket: str = "media"


def insert(synapse: Synapse, statement: str, rows: list[tuple[Any, ...]]) -> None:
    db = synapse.database
    if isinstance(db, SqliteDatabase):
        with sqlite3.connect(db.path, timeout=10) as conn:
            conn.executemany(statement, rows)
        return
    assert isinstance(db, PostgresDatabase)
    numbered = statement
    for i in range(1, statement.count("?") + 1):
        numbered = numbered.replace("?", f"${i}", 1)

    async def run() -> None:
        conn = await asyncpg.connect(db.dsn)
        try:
            await conn.executemany(numbered, rows)
        finally:
            await conn.close()

    asyncio.run(run())


def write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (OLD, OLD))


def restore_all(store: Store) -> None:
    """Write back every file a test evicted (S3 holds each with its size: files it lacks, or
    holds with another size, are never evicted)."""
    rels = [rel for pair in store.remote for rel in pair]
    rels += [paths.local_media(mid) for mid, _ in store.local]
    gone = [rel for rel in rels if not (store.root / rel).exists()]
    client = store.seaweed.client()

    def get(rel: str) -> None:
        write(store.root, rel, client.get_object(Bucket="media", Key=rel)["Body"].read())

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(get, gone))


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    work = tmp_path_factory.mktemp(f"scale-{request.param}")
    seaweed = SeaweedFS(work / "seaweedfs").start()
    pg = None
    database = None
    if request.param == "postgres":
        pg = Postgres(work / "postgres").start()
        database = pg.create_database("synapse")
    synapse = None
    proxy = None
    try:
        s3 = seaweed.create_bucket("media")
        synapse = Synapse(work / "synapse", s3=s3, database=database).start()
        synapse.stop()  # its schema is all this needs
        rng = random.Random(request.param)
        now = int(time.time() * 1000)
        root = synapse.media_store_path
        objects: dict[str, bytes] = {}

        # Remote media, the oldest of all: original and one thumbnail each.
        remote = []
        remote_rows, thumb_rows = [], []
        for i in range(REMOTE_OLDEST):
            fid, mid = rid(rng), rid(rng, 10)
            orig = paths.remote_media(REMOTE, fid)
            thumb = paths.remote_thumbnail(REMOTE, fid, 32, 32, "image/png", "crop")
            objects[orig], objects[thumb] = os.urandom(SIZE), os.urandom(100)
            ts = now - 90 * DAY_MS + i
            remote_rows.append((REMOTE, mid, "image/png", ts, SIZE, fid, ts))
            thumb_rows.append((REMOTE, mid, 32, 32, "crop", "image/png", 100, fid))
            remote.append((orig, thumb))
        insert(
            synapse,
            "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts,"
            " media_length, filesystem_id, last_access_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
            remote_rows,
        )
        insert(
            synapse,
            "INSERT INTO remote_media_cache_thumbnails (media_origin, media_id, thumbnail_width,"
            " thumbnail_height, thumbnail_method, thumbnail_type, thumbnail_length, filesystem_id)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            thumb_rows,
        )

        # Local media: last access spread over 60 days, in an order unrelated to the ids'.
        local = sorted(
            ((rid(rng), now - rng.randint(DAY_MS, 60 * DAY_MS)) for _ in range(N)),
            key=lambda m: m[1],
        )
        with_sha256 = {mid for mid, _ in local[:40:4]}  # some of the oldest: read back
        rows = []
        for mid, ts in local:
            data = os.urandom(SIZE)
            objects[paths.local_media(mid)] = data
            sha = hashlib.sha256(data).hexdigest() if mid in with_sha256 else None
            rows.append((mid, "application/octet-stream", SIZE, ts - 1, "@u:t", ts, sha))
        insert(
            synapse,
            "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts,"
            " user_id, last_access_ts, sha256) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        newest = [mid for mid, _ in local[N // 2 :]]
        picked = rng.sample(newest, NOT_IN_S3 + OTHER_SIZE)
        missing = {paths.local_media(m) for m in picked[:NOT_IN_S3]}
        other_size = {paths.local_media(m) for m in picked[NOT_IN_S3:]}
        for rel, data in objects.items():
            write(root, rel, data)
        client = seaweed.client()

        def put(rel: str) -> None:
            body = objects[rel] + (b"+" if rel in other_size else b"")
            client.put_object(Bucket="media", Key=rel, Body=body)

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(put, [rel for rel in objects if rel not in missing]))

        proxy = FaultProxy(seaweed.host, seaweed.s3_port).start()
        config = work / "media-proxy.yaml"
        config.write_text(yaml.safe_dump({"s3": {"endpoint_url": proxy.url}}))
        yield Store(
            seaweed, synapse, proxy, config, local, remote, missing, other_size, with_sha256
        )
    finally:
        if proxy is not None:
            proxy.stop()
        if pg is not None:
            pg.stop()
        seaweed.stop()


def test_status_lists_and_never_heads(store: Store) -> None:
    s, _ = store.cli("status")
    assert store.heads() == []
    assert s["files"] == N + 2 * REMOTE_OLDEST
    assert s["kinds"]["local_originals"]["files"] == N
    assert s["kinds"]["remote_originals"]["files"] == REMOTE_OLDEST
    assert s["kinds"]["remote_thumbnails"]["files"] == REMOTE_OLDEST
    c = s["s3"]
    assert (c["method"], c["source"]) == ("full", "ListObjectsV2")
    assert c["missing"] == NOT_IN_S3 and c["other_size"] == OTHER_SIZE
    assert c["held"] == N + 2 * REMOTE_OLDEST - NOT_IN_S3 - OTHER_SIZE
    # One request per 1,000 keys of the local folder, one per remote origin folder and kind;
    # the local folder is listed in ranges of RANGE_KEYS, each adding at most one request.
    least = math.ceil((N - NOT_IN_S3) / 1000) + 2
    assert least <= store.lists() == c["list_requests"] <= least + math.ceil(N / RANGE_KEYS)
    # Recency from the database: the remote media are the oldest, by 30 days.
    local_oldest = datetime.datetime.fromtimestamp(store.local[0][1] / 1000 - 86400, datetime.UTC)
    assert s["oldest_access"] < f"{local_oldest:%Y-%m-%dT%H:%M:%SZ}"


def test_upload_dry_run_lists_and_never_heads(store: Store) -> None:
    summary, out = store.cli("upload", "--dry-run")
    assert store.heads() == [] and store.gets() == []
    planned = {line.split()[2] for line in out.splitlines() if line.startswith("would upload ")}
    assert planned == store.missing | store.other_size
    assert summary["skipped"]["already_in_s3"]["files"] == s3_held(store)


def s3_held(store: Store) -> int:
    return N + 2 * REMOTE_OLDEST - NOT_IN_S3 - OTHER_SIZE


def test_evict_takes_the_oldest_and_heads_only_what_it_deletes(store: Store) -> None:
    s, _ = store.cli("status", "--no-s3")
    k = 500  # local files to free after the remote ones
    free = REMOTE_OLDEST * (SIZE + 100) + k * SIZE
    summary, _ = store.cli("evict", "--max-size", str(s["bytes"] - free))

    oldest = [rel for pair in store.remote for rel in pair]
    oldest += [paths.local_media(mid) for mid, _ in store.local[:k]]
    gone = {rel for rel in oldest if not (store.root / rel).exists()}
    assert gone == set(oldest), "not the least recently accessed"
    assert all((store.root / paths.local_media(m)).exists() for m, _ in store.local[k:])
    assert summary["files"] == len(oldest) and summary["over_budget_bytes"] == 0
    # HeadObject for each file deleted and no other; the sha256 read-back for those with one.
    heads = store.heads()
    assert sorted(heads) == sorted(oldest)
    assert sorted(store.gets()) == sorted(paths.local_media(m) for m in store.with_sha256)
    assert store.lists() == 0
    restore_all(store)


def test_evict_past_files_s3_lacks_takes_another_round(store: Store) -> None:
    """Files S3 lacks or holds with another size are kept (HEADed, skipped) and the pass goes
    on to the next oldest: HEADs are what it deletes plus what it skipped."""
    everything = [rel for pair in store.remote for rel in pair]
    everything += [paths.local_media(mid) for mid, _ in store.local]
    skipped = store.missing | store.other_size
    keep = 10  # evictable files to keep, besides those S3 cannot give back
    budget = (len(skipped) + keep) * SIZE
    summary, _ = store.cli("evict", "--max-size", str(budget), "--concurrency", "4")
    evictable = [rel for rel in everything if rel not in skipped]
    newest = evictable[-keep:]
    # Considered: everything up to the last file evicted (oldest first); never what is after.
    considered = everything[: everything.index(evictable[-keep - 1]) + 1]
    assert summary["skipped"]["not_in_s3"]["files"] == len(store.missing & set(considered))
    assert summary["skipped"]["size_differs_in_s3"]["files"] == len(
        store.other_size & set(considered)
    )
    assert summary["files"] == len(set(considered) - skipped)
    assert summary["rounds"] >= 2 and summary["over_budget_bytes"] == 0
    left = {rel for rel in everything if (store.root / rel).exists()}
    assert left == skipped | set(newest)
    # One HeadObject per file considered (evicted or skipped), none for the newest.
    heads = store.heads()
    assert len(heads) == len(set(heads)) and set(heads) == set(considered)


Walk = Callable[[], AsyncIterator[list[CachedFile]]]


def evict_directly(
    store: Store, need: int, walk: Callable[[str, Database], Walk], **limits: Any
) -> Summary:
    """One eviction pass in this process over the store's database and S3 (through the
    counting proxy), freeing `need` bytes, its walks made by `walk(root, db)`."""
    config = load(
        config_file=store.config, synapse_config=[store.synapse.config_path], need_synapse_url=False
    )
    assert config.s3 is not None
    s3_config, root = config.s3, str(store.root)

    async def run() -> Summary:
        db = await open_database(config.database)
        s3 = S3(s3_config)
        await s3.start()
        try:
            total = await asyncio.to_thread(store_bytes, root)
            evictor = Evictor(s3, root, Rules(min_age=0), show_progress=False)
            return await evictor.run(walk(root, db), total, total - need, **limits)
        finally:
            await s3.close()
            await db.close()

    return asyncio.run(run())


@pytest.mark.parametrize("round_files", [ROUND_FILES, 2])
def test_a_pass_whose_walk_outlasts_its_time_limit_still_evicts(
    store: Store, round_files: int
) -> None:
    """The background evictor's time limit (half an interval) bounds evicting, not walking:
    a pass over a store whose walk outlasts it (a million files take about 40 s here,
    against 30 s) must still free space, or the cache grows past its budget for good. The
    walk is slowed between the real walk and the evictor, so that the test does not depend
    on how fast this machine walks. With rounds of 2 files, the last 4 come from sweeps,
    which walk while they evict: their walking is not counted either."""
    restore_all(store)
    limit = 0.2
    oldest = [rel for pair in store.remote for rel in pair]
    need = sum((store.root / rel).stat().st_size for rel in oldest)

    def slow(root: str, db: Database) -> Walk:
        async def slow_walk() -> AsyncIterator[list[CachedFile]]:
            async for chunk in chunks(root, db):
                yield chunk
            await asyncio.sleep(2 * limit)  # the walk ends past the time limit

        return slow_walk

    summary = evict_directly(
        store, need, slow, max_files=BACKGROUND_MAX_FILES, time_limit=limit, round_files=round_files
    )
    try:
        assert summary.files == len(oldest), summary.as_dict()
        assert summary.extra["over_budget_bytes"] == 0
        assert not any((store.root / rel).exists() for rel in oldest)
        # Rounds of 2: the first round's heap, then two sweeps (the six files share one hour
        # of last access, so each sweep's heap of that hour holds 2).
        assert summary.extra["rounds"] == (1 if round_files == ROUND_FILES else 3)
    finally:
        restore_all(store)


def test_an_eviction_past_one_round_of_candidates_takes_one_more_walk(store: Store) -> None:
    """A pass that must free more files than a round holds (`round_files`, 50,000 in use;
    200 here) keeps the oldest 200 from its first walk and a histogram of what it left by
    recency; one more walk then evicts every file older than the cutoff as it finds them:
    two walks however many rounds of 200 the need covers (eight here), and still exactly the
    least recently accessed files, one HeadObject each."""
    restore_all(store)
    k = 1500  # local files to free after the remote ones
    oldest = [rel for pair in store.remote for rel in pair]
    oldest += [paths.local_media(mid) for mid, _ in store.local[:k]]
    need = sum((store.root / rel).stat().st_size for rel in oldest)
    walks = 0

    def counted(root: str, db: Database) -> Walk:
        def walk() -> AsyncIterator[list[CachedFile]]:
            nonlocal walks
            walks += 1
            return chunks(root, db)

        return walk

    store.proxy.reset()
    summary = evict_directly(store, need, counted, round_files=200)
    try:
        assert summary.files == len(oldest) and not summary.skipped, summary.as_dict()
        assert summary.extra["over_budget_bytes"] == 0
        assert walks == 2 and summary.extra["rounds"] == 2
        gone = {rel for rel in oldest if not (store.root / rel).exists()}
        assert gone == set(oldest), "not the least recently accessed"
        assert all((store.root / paths.local_media(m)).exists() for m, _ in store.local[k:])
        assert sorted(store.heads()) == sorted(oldest)
    finally:
        restore_all(store)


def test_background_passes_go_on_until_the_store_fits(store: Store, tmp_path: Path) -> None:
    """`serve --cache-max-size` over a store far over budget: each pass stops at its time
    limit (a tiny interval's), and the next one goes on at once from its own walk, without
    walking first to measure, until the store fits; the least recently accessed go first."""
    restore_all(store)
    s, _ = store.cli("status", "--no-s3")
    k = 1000  # local files to free after the remote ones
    oldest = [rel for pair in store.remote for rel in pair]
    oldest += [paths.local_media(mid) for mid, _ in store.local[:k]]
    budget = s["bytes"] - sum((store.root / rel).stat().st_size for rel in oldest)
    config = yaml.safe_load(store.config.read_text())
    config.update(cache_max_size=budget, cache_min_age=0, cache_evict_interval=0.1)
    proxy = MediaProxy(
        tmp_path / "proxy",
        synapse_config=store.synapse.config_path,
        synapse_url="http://127.0.0.1:9",  # never asked: no request is made
        config=config,
    ).start()
    try:
        deadline = time.monotonic() + 120
        while True:  # until a pass says the store fits
            passes = [e for e in proxy.log_events() if e.get("event") == "cache_evict.pass"]
            if passes and passes[-1]["over_budget_bytes"] == 0:
                break
            assert time.monotonic() < deadline, ("cache still over budget", passes[-1:])
            time.sleep(0.2)
        assert sum(f.size for f in walk(str(store.root))) <= budget
    finally:
        proxy.stop()
        restore_all(store)
    assert len(passes) >= 2, passes
    assert passes[0]["stopped"] == "time_limit" and "budget_walk_s" in passes[0]
    for before, after in itertools.pairwise(passes):
        # a pass stopped at its limits is followed by one that does not measure first
        assert ("budget_walk_s" in after) == ("stopped" not in before), (before, after)
    assert sum(p["files"] for p in passes) == len(oldest)
    assert passes[-1]["over_budget_bytes"] == 0
