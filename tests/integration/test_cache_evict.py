"""The cache's upkeep against real SeaweedFS, a real Synapse (SQLite and PostgreSQL, with the
S3 provider) and the real store layout: `media-proxy cache status|upload|evict` run as
commands, and `media-proxy serve --cache-max-size` as a process.

Files are made "old" with os.utime and old `last_access_ts`/`created_ts` in the database.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devstack.postgres import Postgres
from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths
from media_proxy.inventory import walk
from tests.integration.media import Media, bearer, request, sql, stored_bytes, upload

pytestmark = pytest.mark.integration

DAY = 86400
OLD = time.time() - 3 * DAY
OLD_MS = int(OLD * 1000)
REMOTE = "remote.test"


def random_id(n: int = 24) -> str:
    return "".join(random.choices(string.ascii_letters, k=n))


@dataclass
class Stack:
    seaweed: SeaweedFS
    bucket: str
    synapse: Synapse
    token: str

    @property
    def root(self) -> Path:
        return self.synapse.media_store_path

    def s3(self) -> Any:
        return self.seaweed.client()

    def s3_size(self, rel: str) -> int | None:
        try:
            return int(self.s3().head_object(Bucket=self.bucket, Key=rel)["ContentLength"])
        except Exception as e:  # botocore's ClientError for 404
            if "404" in str(e) or "Not Found" in str(e):
                return None
            raise

    def put(self, rel: str, data: bytes) -> None:
        self.s3().put_object(Bucket=self.bucket, Key=rel, Body=data)

    def cli_argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "media_proxy",
            "cache",
            *args,
            "--synapse-config",
            str(self.synapse.config_path),
            "--log-format",
            "json",
        ]

    def cli(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.cli_argv(*args), capture_output=True, text=True, timeout=300, check=False
        )
        if ok:
            assert result.returncode == 0, (result.returncode, result.stdout, result.stderr[-3000:])
        return result

    def cli_json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.cli(*args, "--json").stdout.splitlines()[-1])
        return out

    def upload(self, data: bytes, content_type: str = "application/octet-stream") -> Media:
        return upload(
            self.synapse.url,
            self.token,
            data,
            content_type=content_type,
            name="f.bin",
            server_name=self.synapse.server_name,
        )

    def files_of(self, media: Media) -> list[str]:
        """The original and every thumbnail of a local media, as store paths."""
        rels = [media.rel] if (self.root / media.rel).exists() else []
        thumbs = self.root / paths.local_thumbnail_dir(media.media_id)
        if thumbs.is_dir():
            rels += [f"{paths.local_thumbnail_dir(media.media_id)}/{n}" for n in os.listdir(thumbs)]
        return rels

    def make_old(self, media: Media, *, rels: list[str] | None = None) -> list[str]:
        rels = rels if rels is not None else self.files_of(media)
        for rel in rels:
            os.utime(self.root / rel, (OLD, OLD))
        sql(
            self.synapse,
            "UPDATE local_media_repository SET last_access_ts = ?, created_ts = ?"
            " WHERE media_id = ?",
            OLD_MS,
            OLD_MS,
            media.media_id,
        )
        return rels

    def write(self, rel: str, data: bytes, *, old: bool = True) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if old:
            os.utime(path, (OLD, OLD))

    def download(self, proxy: MediaProxy, media: Media) -> bytes:
        answer = request(proxy.url, media.client_path(), headers=bearer(self.token))
        assert answer.status == 200 and answer.complete, (answer.status, answer.body[:200])
        return answer.body


def tree(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every file of the media folders: size, mtime and sha256."""
    out = {}
    for f in walk(str(root)):
        data = (root / f.rel).read_bytes()
        out[f.rel] = (f.size, f.mtime_ns, hashlib.sha256(data).hexdigest())
    return out


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp(f"cache-{request.param}")
    seaweed = SeaweedFS(work / "seaweedfs").start()
    s3 = seaweed.create_bucket("media")
    pg = None
    database = None
    if request.param == "postgres":
        pg = Postgres(work / "postgres").start()
        database = pg.create_database("synapse")
    synapse = Synapse(work / "synapse", s3=s3, database=database).start()
    token = synapse.register_user("cacheuser", "cache-password")
    try:
        yield Stack(seaweed, s3.bucket, synapse, token)
    finally:
        synapse.stop()
        if pg is not None:
            pg.stop()
        seaweed.stop()


@pytest.fixture
def proxy(stack: Stack, tmp_path: Path) -> Iterator[MediaProxy]:
    p = MediaProxy(
        tmp_path / "proxy", synapse_config=stack.synapse.config_path, synapse_url=stack.synapse.url
    ).start()
    try:
        yield p
    finally:
        p.stop()


def test_evict_keeps_what_s3_cannot_give_back(stack: Stack, proxy: MediaProxy) -> None:
    root = stack.root
    evictable = stack.upload(png(64, 48, 7), "image/png")  # original + thumbnails, all in S3
    evictable_rels = stack.make_old(evictable)
    assert len(evictable_rels) > 1, "Synapse made no thumbnails"
    lacking = stack.upload(os.urandom(3000))
    stack.make_old(lacking)
    stack.s3().delete_object(Bucket=stack.bucket, Key=lacking.rel)
    other_size = stack.upload(os.urandom(4000))
    stack.make_old(other_size)
    stack.put(other_size.rel, os.urandom(4001))
    young = stack.upload(os.urandom(5000))  # mtime now, even with an old last access
    sql(
        stack.synapse,
        "UPDATE local_media_repository SET last_access_ts = ? WHERE media_id = ?",
        OLD_MS,
        young.media_id,
    )
    # URL previews: their folders, and a local row with url_cache set, even when S3 has it.
    previews = [
        f"url_cache/2026-11-20/{random_id(16)}",
        f"url_cache_thumbnails/2026-11-20/{random_id(16)}/32-32-image-png-crop",
    ]
    for rel in previews:
        stack.write(rel, os.urandom(700))
        stack.put(rel, (root / rel).read_bytes())
    preview_id = random_id()
    preview_rel = paths.local_media(preview_id)
    stack.write(preview_rel, os.urandom(800))
    stack.put(preview_rel, (root / preview_rel).read_bytes())
    sql(
        stack.synapse,
        "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts,"
        " user_id, url_cache, last_access_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
        preview_id,
        "image/png",
        800,
        OLD_MS,
        "@x:devstack.test",
        "https://example.org/",
        OLD_MS,
    )
    previews.append(preview_rel)
    # Remote media: rows, original and thumbnail in the store and in S3.
    fid, remote_id = random_id(), random_id(10)
    remote_rel = paths.remote_media(REMOTE, fid)
    remote_thumb = paths.remote_thumbnail(REMOTE, fid, 32, 32, "image/png", "crop")
    for rel, size in ((remote_rel, 2000), (remote_thumb, 300)):
        stack.write(rel, os.urandom(size))
        stack.put(rel, (root / rel).read_bytes())
    sql(
        stack.synapse,
        "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts,"
        " media_length, filesystem_id, last_access_ts) VALUES (?, ?, ?, ?, ?, ?, ?)",
        REMOTE,
        remote_id,
        "image/png",
        OLD_MS,
        2000,
        fid,
        OLD_MS,
    )
    sql(
        stack.synapse,
        "INSERT INTO remote_media_cache_thumbnails (media_origin, media_id, thumbnail_width,"
        " thumbnail_height, thumbnail_method, thumbnail_type, thumbnail_length, filesystem_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        REMOTE,
        remote_id,
        32,
        32,
        "crop",
        "image/png",
        300,
        fid,
    )
    before = tree(root)

    summary = stack.cli_json("evict", "--max-size", "0", "--min-age", "1d")

    after = tree(root)
    for rel in [*evictable_rels, remote_rel, remote_thumb]:
        assert rel not in after, rel
        assert stack.s3_size(rel) == before[rel][0]
    kept = [lacking.rel, other_size.rel, young.rel, *previews]
    for rel in kept:
        assert after.get(rel) == before[rel], rel
    assert not (root / paths.remote_thumbnail_dir(REMOTE, fid)).exists()  # empty folders pruned
    assert (root / "remote_thumbnail").is_dir() and (root / "local_content").is_dir()
    for reason in ("not_in_s3", "size_differs_in_s3", "too_young"):
        assert summary["skipped"][reason]["files"] >= 1, summary
    assert summary["files"] >= len(evictable_rels) + 2

    # Every evicted local file is served identically through the proxy and lands back.
    assert stack.download(proxy, evictable) == evictable.data
    assert stored_bytes(stack.synapse, evictable) == evictable.data  # renamed in just after
    assert stack.download(proxy, lacking) == lacking.data


def test_dry_run_changes_nothing_and_prints_the_plan(stack: Stack) -> None:
    media = stack.upload(os.urandom(6000))
    rels = stack.make_old(media)
    before = tree(stack.root)
    result = stack.cli("evict", "--max-size", "0", "--dry-run")
    assert tree(stack.root) == before
    assert f"evict {media.rel} 6000 " in result.stdout
    assert "would evict:" in result.stdout
    assert all(stack.s3_size(rel) is not None for rel in rels)


def test_upload_then_evict_then_serve(stack: Stack, proxy: MediaProxy) -> None:
    small = stack.upload(os.urandom(10_000))
    big = stack.upload(os.urandom(9 * 1024 * 1024 + 5))  # multipart
    for media in (small, big):
        stack.s3().delete_object(Bucket=stack.bucket, Key=media.rel)  # as with store_local: false
    stray = paths.local_media(random_id())  # no row: never uploaded
    stack.write(stray, os.urandom(100), old=False)

    dry = stack.cli("upload", "--dry-run")
    assert f"would upload {small.rel} 10000" in dry.stdout
    assert stack.s3_size(small.rel) is None
    summary = stack.cli_json("upload", "--concurrency", "4")
    assert summary["files"] >= 2, summary
    assert summary["skipped"]["no_db_row"]["files"] >= 1
    assert stack.s3_size(small.rel) == 10_000
    assert stack.s3_size(big.rel) == len(big.data)
    assert stack.s3_size(stray) is None
    again = stack.cli_json("upload")  # resumable: nothing left to do
    assert again["files"] == 0 and again["skipped"]["already_in_s3"]["files"] >= 2

    stack.cli("evict", "--max-size", "0", "--min-age", "0")
    assert not (stack.root / small.rel).exists() and not (stack.root / big.rel).exists()
    assert (stack.root / stray).exists()
    for media in (small, big):
        assert stack.download(proxy, media) == media.data
        assert stored_bytes(stack.synapse, media) == media.data


def test_evict_upload_missing(stack: Stack) -> None:
    media = stack.upload(os.urandom(7000))
    stack.make_old(media)
    stack.s3().delete_object(Bucket=stack.bucket, Key=media.rel)
    summary = stack.cli_json("evict", "--max-size", "0", "--upload-missing")
    assert summary["uploaded_files"] >= 1
    assert not (stack.root / media.rel).exists()
    assert stack.s3_size(media.rel) == 7000


def test_status(stack: Stack) -> None:
    media = stack.upload(os.urandom(1234))
    s = stack.cli_json("status")
    assert s["s3"]["method"] == "full"
    assert s["kinds"]["local_originals"]["files"] >= 1
    assert s["files"] == sum(k["files"] for k in s["kinds"].values())
    assert s["s3"]["held"] >= 1
    sampled = stack.cli_json("status", "--sample", "2")
    assert sampled["s3"]["method"] == "sample of 2 files"
    text = stack.cli("status", "--no-s3").stdout
    assert "local_originals" in text and "S3: not checked" in text
    assert media.rel in {f.rel for f in walk(str(stack.root))}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["evict", "--max-size", "lots"], "--max-size: expected a size"),
        (["evict", "--max-size", "1G", "--min-age", "yesterday"], "--min-age: expected a duration"),
        (["upload", "--concurrency", "0"], "--concurrency: expected a whole number"),
        (["evict"], "--max-size: required"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(stack: Stack, args: list[str], message: str) -> None:
    result = stack.cli(*args, ok=False)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_sigkill_mid_run_loses_nothing_and_a_rerun_finishes(stack: Stack) -> None:
    rels = [paths.local_media(random_id()) for _ in range(1500)]
    blobs = {rel: os.urandom(random.randint(100, 3000)) for rel in rels}
    for rel, data in blobs.items():
        stack.write(rel, data)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda rel: stack.put(rel, blobs[rel]), rels))

    proc = subprocess.Popen(
        stack.cli_argv("evict", "--max-size", "0", "--concurrency", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while sum((stack.root / rel).exists() for rel in rels[::50]) > 20:
            assert time.monotonic() < deadline and proc.poll() is None, "evictor too fast or stuck"
            time.sleep(0.005)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    left = [rel for rel in rels if (stack.root / rel).exists()]
    assert 0 < len(left) < len(rels), "kill did not land mid-run"
    for rel in left:  # nothing partial
        assert (stack.root / rel).read_bytes() == blobs[rel]
    for rel in rels:  # nothing lost
        assert stack.s3_size(rel) == len(blobs[rel])
    stack.cli("evict", "--max-size", "0")
    assert not any((stack.root / rel).exists() for rel in rels)


def test_background_evictor_keeps_the_budget(stack: Stack, tmp_path: Path) -> None:
    stack.cli("evict", "--max-size", "0", "--min-age", "0")  # start from what must stay
    base = stack.cli_json("status", "--no-s3")["bytes"]
    budget = base + 2 * 1024 * 1024
    proxy = MediaProxy(
        tmp_path / "proxy",
        synapse_config=stack.synapse.config_path,
        synapse_url=stack.synapse.url,
        workers=2,
        config={"cache_max_size": budget, "cache_min_age": 0, "cache_evict_interval": 0.3},
    ).start()
    try:
        uploaded: list[Media] = []
        peak = 0
        for i in range(40):
            uploaded.append(stack.upload(os.urandom(200_000 + i)))
            old = random.choice(uploaded)
            assert stack.download(proxy, old) == old.data  # a miss or a hit
            peak = max(peak, sum(f.size for f in walk(str(stack.root))))
            time.sleep(0.2)  # at most ~2 rounds (upload + refill, 400 kB each) per interval
        deadline = time.monotonic() + 10
        while sum(f.size for f in walk(str(stack.root))) > budget:
            assert time.monotonic() < deadline, "cache still over budget"
            time.sleep(0.1)
        assert sum(m.data.__len__() for m in uploaded) > 3 * (budget - base)
        # Over budget only by what arrives between two passes.
        assert peak <= budget + 3 * 400_200, (peak, budget)
        log = proxy.log_path.read_text()
        assert '"event": "cache_evict.pass"' in log
        for media in uploaded[::7]:
            assert stack.download(proxy, media) == media.data
    finally:
        proxy.stop()


def test_background_evictor_says_when_nothing_is_evictable(stack: Stack, tmp_path: Path) -> None:
    media = stack.upload(os.urandom(50_000))  # young: the background min-age keeps it
    proxy = MediaProxy(
        tmp_path / "proxy",
        synapse_config=stack.synapse.config_path,
        synapse_url=stack.synapse.url,
        config={"cache_max_size": 0, "cache_min_age": "1h", "cache_evict_interval": 0.2},
    ).start()
    try:
        time.sleep(1.5)
    finally:
        proxy.stop()
    assert (stack.root / media.rel).exists()
    events = proxy.log_events()
    over = [e for e in events if e.get("event") == "cache.over_budget"]
    passes = [e for e in events if e.get("event") == "cache_evict.pass"]
    assert 1 <= len(over) <= len(passes) <= 1.5 / 0.2 + 1
    assert over[-1]["skipped"]["too_young"]["files"] >= 1
    # with one worker too, the passes ran in the evictor's own process, not a serving loop
    assert {e.get("process") for e in passes} == {"upkeep"}
