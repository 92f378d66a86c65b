"""`media-proxy s3 prune|audit` against a real Synapse (SQLite and PostgreSQL, with the S3
provider writing to real SeaweedFS), run as commands the way an admin runs them.

Media are deleted through Synapse's own admin API (one media, by date, by user), remote media
are written as Synapse writes them (rows + objects) and dropped as `purge_media_cache` drops
them. The Synapse and its bucket are shared with other test modules, so every assertion names
the keys it made; the exact orphan count of `audit` is taken after a prune has removed every
older orphan.
"""

from __future__ import annotations

import json
import os
import random
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths
from tests.faults import FaultProxy
from tests.integration.media import Media, sql, upload

pytestmark = pytest.mark.integration

REMOTE = "remote.lifecycle.test"
ADMIN = "/_synapse/admin/v1"


def random_id(n: int = 24) -> str:
    return "".join(random.choices(string.ascii_letters, k=n))


@dataclass
class Env:
    synapse: Synapse
    seaweed: SeaweedFS
    workdir: Path
    admin: str  # admin access token
    token: str  # the uploader's token

    @property
    def bucket(self) -> str:
        assert self.synapse.s3 is not None
        return self.synapse.s3.bucket

    def objects(self) -> dict[str, tuple[int, str]]:
        """Every object of the bucket: key -> (size, ETag), listed directly."""
        out: dict[str, tuple[int, str]] = {}
        client = self.seaweed.client()
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = client.list_objects_v2(Bucket=self.bucket, **extra)
            for o in page.get("Contents", []):
                out[o["Key"]] = (int(o["Size"]), o["ETag"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated"):
                return out

    def put(self, key: str, data: bytes) -> None:
        self.seaweed.client().put_object(Bucket=self.bucket, Key=key, Body=data)

    def argv(self, *args: str, endpoint: str | None = None) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "media_proxy",
            "s3",
            *args,
            "--synapse-config",
            str(self.synapse.config_path),
            "--log-format",
            "json",
        ]
        if endpoint is not None:
            config = self.workdir / f"via-{random_id(6)}.yaml"
            config.write_text(yaml.safe_dump({"s3": {"endpoint_url": endpoint}}))
            argv += ["--config", str(config)]
        return argv

    def cli(self, *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=300, check=False
        )
        assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
        return result

    def cli_json(self, *args: str, status: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(
            self.cli(*args, "--json", status=status).stdout.splitlines()[-1]
        )
        return out

    def prune_all(self) -> dict[str, Any]:
        """Remove every orphan now in the bucket (other modules leave some behind)."""
        return self.cli_json("prune", "--min-age", "0")

    def upload(self, data: bytes, content_type: str = "image/png", token: str = "") -> Media:
        return upload(
            self.synapse.url,
            token or self.token,
            data,
            content_type=content_type,
            name="f.png",
            server_name=self.synapse.server_name,
        )

    def image(self, seed: int, token: str = "") -> Media:
        media = self.upload(png(64, 48, seed), token=token)
        assert len(self.keys_of(media)) > 1, "Synapse made no thumbnails"
        return media

    def keys_of(self, media: Media) -> set[str]:
        """The original's and every thumbnail's object of a local media, as listed now."""
        thumbs = paths.local_thumbnail_dir(media.media_id) + "/"
        return {k for k in self.objects() if k == media.rel or k.startswith(thumbs)}

    def admin_api(self, method: str, path: str) -> dict[str, Any]:
        status, _, body = self.synapse.request(method, ADMIN + path, token=self.admin)
        assert status == 200, (status, body[:300])
        result: dict[str, Any] = json.loads(body)
        return result

    def delete_media(self, media: Media) -> None:
        self.admin_api("DELETE", f"/media/{self.synapse.server_name}/{media.media_id}")


@pytest.fixture(scope="module")
def owner_token(synapse: Synapse) -> str:
    return synapse.register_user("lifecycle", "lifecycle-password")


@pytest.fixture
def env(
    synapse: Synapse, seaweed: SeaweedFS, admin_token: str, owner_token: str, tmp_path: Path
) -> Iterator[Env]:
    yield Env(synapse, seaweed, tmp_path, admin_token, owner_token)


def test_prune_removes_what_synapse_deleted_and_keeps_the_rest(env: Env) -> None:
    by_id = env.image(1)
    by_date = env.image(2)
    kept = env.image(3)
    kept_plain = env.upload(os.urandom(3000), "application/octet-stream")
    gone_user = f"gone{random_id(8).lower()}"
    other_token = env.synapse.register_user(gone_user, "pw-gone-user")
    by_user = env.image(4, token=other_token)
    doomed = {m.media_id: env.keys_of(m) for m in (by_id, by_date, by_user)}
    survivors = env.keys_of(kept) | env.keys_of(kept_plain)
    assert env.keys_of(kept_plain) == {kept_plain.rel}

    # Synapse's three ways of deleting local media; the S3 objects stay (the gap).
    env.delete_media(by_id)
    sql(
        env.synapse,
        "UPDATE local_media_repository SET last_access_ts = 978307200000 WHERE media_id = ?",
        by_date.media_id,
    )
    deleted = env.admin_api("POST", "/media/delete?before_ts=978307201000")
    assert deleted["deleted_media"] == [by_date.media_id]
    gone_by_user = env.admin_api("DELETE", f"/users/{env.synapse.user_id(gone_user)}/media")
    assert gone_by_user["deleted_media"] == [by_user.media_id]
    for media_id, keys in doomed.items():
        assert keys and keys <= set(env.objects()), media_id
        assert not sql(
            env.synapse, "SELECT 1 FROM local_media_repository WHERE media_id = ?", media_id
        )

    # Keys Synapse never writes: never deleted, whatever their age.
    strays = [f"local_content/{random_id(2)}/stray+{random_id(8)}", f"junk/{random_id(10)}.tar"]
    for key in strays:
        env.put(key, b"not media")

    report = env.cli_json("prune", "--min-age", "0")
    after = set(env.objects())
    for media_id, keys in doomed.items():
        assert not keys & after, media_id
    assert survivors <= after
    assert set(strays) <= after
    assert set(strays) <= set(report["unparseable"])
    assert report["skipped"]["unparseable"]["objects"] >= len(strays)
    ours = sum(len(k) for k in doomed.values())
    assert report["objects"] >= ours
    assert report["by_kind"]["local_originals"]["objects"] >= 3
    assert report["by_kind"]["local_thumbnails"]["objects"] >= ours - 3
    assert report["reasons"]["media_row_gone"] >= ours
    # A second run finds nothing of ours and deletes nothing it should not.
    again = env.cli_json("prune", "--min-age", "0")
    assert again["objects"] == 0
    assert survivors | set(strays) <= set(env.objects())
    for key in strays:
        env.seaweed.client().delete_object(Bucket=env.bucket, Key=key)


def test_min_age_and_kinds(env: Env) -> None:
    media = env.image(5)
    keys = env.keys_of(media)
    thumbs = {k for k in keys if k != media.rel}
    env.delete_media(media)

    young = env.cli_json("prune", "--min-age", "1h")
    assert keys <= set(env.objects())
    assert young["skipped"]["too_young"]["objects"] >= len(keys)
    assert young["objects"] == 0

    only_thumbs = env.cli_json("prune", "--min-age", "0", "--kinds", "local_thumbnails")
    after = set(env.objects())
    assert media.rel in after and not thumbs & after
    assert only_thumbs["by_kind"]["local_originals"]["objects"] == 0
    assert only_thumbs["skipped"]["kind_not_selected"]["objects"] >= 1

    env.cli_json("prune", "--min-age", "0", "--kinds", "local_originals")
    assert media.rel not in env.objects()


def test_dry_run_changes_nothing(env: Env) -> None:
    media = env.image(6)
    keys = env.keys_of(media)
    env.delete_media(media)
    before = env.objects()
    result = env.cli("prune", "--min-age", "0", "--dry-run")
    assert env.objects() == before
    lines = result.stdout.splitlines()
    for key in keys:
        kind = "local_originals" if key == media.rel else "local_thumbnails"
        assert any(
            line.startswith(f"would delete {kind} {key} {before[key][0]} media_row_gone")
            for line in lines
        ), key
    assert any(line.startswith("would delete: ") for line in lines), lines[-12:]
    report = env.cli_json("prune", "--min-age", "0", "--dry-run")
    assert report["action"] == "would delete" and report["objects"] >= len(keys)
    assert env.objects() == before
    env.prune_all()


def _remote_media(env: Env, media_id: str, fid: str, data: bytes) -> list[str]:
    """A remote media as Synapse caches it: row, thumbnail row, file objects (the current
    thumbnail name and the legacy one Synapse also looks up)."""
    now = int(time.time() * 1000)
    sql(
        env.synapse,
        "INSERT INTO remote_media_cache (media_origin, media_id, media_type, created_ts,"
        " upload_name, media_length, filesystem_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
        REMOTE,
        media_id,
        "image/png",
        now,
        "r.png",
        len(data),
        fid,
    )
    sql(
        env.synapse,
        "INSERT INTO remote_media_cache_thumbnails (media_origin, media_id, thumbnail_width,"
        " thumbnail_height, thumbnail_method, thumbnail_type, thumbnail_length, filesystem_id)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        REMOTE,
        media_id,
        32,
        32,
        "crop",
        "image/jpeg",
        10,
        fid,
    )
    original = paths.remote_media(REMOTE, fid)
    thumb = paths.remote_thumbnail(REMOTE, fid, 32, 32, "image/jpeg", "crop")
    legacy = thumb.rsplit("-", 1)[0]
    env.put(original, data)
    env.put(thumb, b"t" * 10)
    env.put(legacy, b"t" * 10)
    return [original, thumb, legacy]


def _purge_remote(env: Env, media_id: str) -> None:
    """What purge_media_cache does to the database (its files are in the store only)."""
    for table in ("remote_media_cache_thumbnails", "remote_media_cache"):
        sql(
            env.synapse,
            f"DELETE FROM {table} WHERE media_origin = ? AND media_id = ?",
            REMOTE,
            media_id,
        )


def test_remote_media_pruned_when_their_rows_are_purged(env: Env) -> None:
    kept_id, gone_id = random_id(12), random_id(12)
    kept = _remote_media(env, kept_id, random_id(), os.urandom(2000))
    gone = _remote_media(env, gone_id, random_id(), os.urandom(3000))
    # The kept media's filesystem id under another origin is another (row-less) media.
    fid = kept[0].split("/", 2)[2].replace("/", "")
    elsewhere = paths.remote_media("elsewhere.test", fid)
    env.put(elsewhere, b"x")
    # A thumbnail name with no row, beside kept thumbnails.
    stray_thumb = paths.remote_thumbnail(REMOTE, fid, 640, 480, "image/jpeg", "scale")
    env.put(stray_thumb, b"y")
    _purge_remote(env, gone_id)

    report = env.cli_json("prune", "--min-age", "0")
    after = set(env.objects())
    assert set(kept) <= after
    assert not set(gone) & after
    assert elsewhere not in after and stray_thumb not in after
    assert report["by_kind"]["remote_originals"]["objects"] >= 2
    assert report["by_kind"]["remote_thumbnails"]["objects"] >= 3
    assert report["reasons"]["thumbnail_row_gone"] >= 1
    _purge_remote(env, kept_id)
    env.prune_all()
    assert not set(kept) & set(env.objects())


_LOCAL_COLUMNS = (
    "media_id, media_type, media_length, created_ts, upload_name, user_id, quarantined_by,"
    " url_cache, last_access_ts, safe_from_quarantine, authenticated, sha256"
)


def test_media_restored_or_uploaded_while_prune_runs_survive(
    env: Env, s3_faults: FaultProxy
) -> None:
    """DeleteObjects answers are held back by the fault proxy; while the first is held, a
    media whose row was missing gets it back and a new media is uploaded. The next batch's
    re-check sees the row: its objects stay, and the prune says so."""
    env.prune_all()
    restored = env.image(7)
    restored_keys = env.keys_of(restored)
    # An orphan right before the restored original in key order (a prefix sorts first), so
    # both are in one listing page and it is the first, and only, object deleted.
    rest = restored.rel.rsplit("/", 1)
    first = f"{rest[0]}/{rest[1][:-1]}"
    listing = sorted([*env.objects(), first])
    if (listing.index(first) + 1) % 1000 == 0:  # keep the two off a page boundary
        env.put(f"{rest[0]}/+", b"unparseable filler")
    env.put(first, b"orphan")
    row = sql(
        env.synapse,
        f"SELECT {_LOCAL_COLUMNS} FROM local_media_repository WHERE media_id = ?",
        restored.media_id,
    )[0]
    sql(env.synapse, "DELETE FROM local_media_repository WHERE media_id = ?", restored.media_id)

    latency = 8.0
    s3_faults.set_latency(
        latency, match=lambda method, path: method == "POST" and "?delete" in path
    )
    argv = env.argv(
        "prune", "--min-age", "0", "--batch-size", "1", "--json", endpoint=s3_faults.url
    )
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not s3_faults.count("POST") and proc.poll() is None:
            assert time.monotonic() < deadline, "prune sent no DeleteObjects"
            time.sleep(0.01)
        seen = time.monotonic()
        assert proc.poll() is None, proc.communicate()
        placeholders = ", ".join("?" * len(row))
        sql(
            env.synapse,
            f"INSERT INTO local_media_repository ({_LOCAL_COLUMNS}) VALUES ({placeholders})",
            *row,
        )
        fresh = env.image(8)
        assert time.monotonic() - seen < latency, "the test was slower than the held answer"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (stdout, stderr)
    report = json.loads(stdout.splitlines()[-1])
    after = set(env.objects())
    assert first not in after
    assert restored_keys <= after
    assert env.keys_of(fresh) <= after and env.keys_of(fresh)
    # The restored original was an orphan when listed and was kept by its batch's re-check.
    assert report["skipped"]["row_reappeared"]["objects"] >= 1
    kept_events = [
        json.loads(line)
        for line in stderr.splitlines()
        if line.startswith("{") and '"s3_prune.kept"' in line
    ]
    assert {e["key"] for e in kept_events} >= {restored.rel}
    assert len([r for r in s3_faults.requests if r.method == "POST"]) == 1
    assert report["objects"] == 1


def test_audit_finds_lost_media_and_counts_orphans(env: Env) -> None:
    env.prune_all()
    lost = env.upload(os.urandom(4000), "application/octet-stream")
    s3_only = env.upload(os.urandom(5000), "application/octet-stream")
    both = env.upload(os.urandom(6000), "application/octet-stream")
    (env.synapse.media_store_path / lost.rel).unlink()
    env.seaweed.client().delete_object(Bucket=env.bucket, Key=lost.rel)
    (env.synapse.media_store_path / s3_only.rel).unlink()
    # Exactly these orphans: a deleted media with thumbnails, a row-less local original,
    # a row-less remote original.
    deleted = env.image(9)
    orphan_keys = env.keys_of(deleted)
    env.delete_media(deleted)
    extra = [
        paths.local_media(random_id()),
        paths.remote_media(REMOTE, random_id()),
    ]
    for key in extra:
        env.put(key, b"z" * 7)
    stray = f"junk/{random_id(10)}"
    env.put(stray, b"not media")
    before = env.objects()

    report = env.cli_json("audit", status=3)
    assert env.objects() == before  # read-only
    assert report["orphans"] == len(orphan_keys) + 2
    assert report["orphans_by_kind"]["local_originals"]["objects"] == 2
    assert report["orphans_by_kind"]["local_thumbnails"]["objects"] == len(orphan_keys) - 1
    assert report["orphans_by_kind"]["remote_originals"] == {"objects": 1, "bytes": 7}
    assert report["orphan_bytes"] == sum(before[k][0] for k in [*orphan_keys, *extra])
    assert stray in report["unparseable_keys"]
    lost_ids = {m["media_id"]: m for m in report["lost_media"]}
    assert lost.media_id in lost_ids
    assert s3_only.media_id not in lost_ids and both.media_id not in lost_ids
    entry = lost_ids[lost.media_id]
    assert entry["kind"] == "local_originals" and entry["bytes"] == 4000
    assert entry["uploader"] == env.synapse.user_id("lifecycle")
    assert entry["created"] is not None
    local = report["media"]["local_originals"]
    assert local["nowhere"] == report["lost"] >= 1
    assert local["s3_only"] >= 1 and local["both"] >= 1

    text = env.cli("audit", status=3)
    assert any(
        line.startswith(f"LOST local_originals {lost.media_id} bytes=4000")
        for line in text.stdout.splitlines()
    ), text.stdout[-2000:]

    # Once pruned and the lost media deleted in Synapse, the audit is clean of ours.
    env.prune_all()
    env.delete_media(lost)
    final = subprocess.run(
        env.argv("audit", "--json"), capture_output=True, text=True, timeout=300, check=False
    )
    clean = json.loads(final.stdout.splitlines()[-1])
    assert final.returncode == (3 if clean["lost"] else 0)  # others' lost media may remain
    assert clean["orphans"] == 0
    assert lost.media_id not in {m["media_id"] for m in clean["lost_media"]}
    env.seaweed.client().delete_object(Bucket=env.bucket, Key=stray)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["prune", "--min-age", "soon"], "--min-age"),
        (["prune", "--kinds", "local_originals,avatars"], "--kinds"),
        (["prune", "--batch-size", "5000"], "--batch-size"),
        (["prune", "--batch-size", "0"], "--batch-size"),
    ],
)
def test_bad_input_is_one_line(env: Env, args: list[str], named: str) -> None:
    before = env.objects()
    result = env.cli(*args, status=2)
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and named in result.stderr, result.stderr
    assert env.objects() == before


def test_serve_prunes_in_the_background_when_asked(env: Env) -> None:
    """`s3_prune_interval` in `serve`: the same rules, one event per pass, in the upkeep
    process, never a serving worker (a pass lists the whole bucket)."""
    env.prune_all()
    kept = env.image(10)
    deleted = env.image(11)
    doomed = env.keys_of(deleted)
    env.delete_media(deleted)
    stray = f"junk/{random_id(10)}"
    env.put(stray, b"not media")
    proxy = MediaProxy(
        env.workdir / "proxy",
        synapse_config=env.synapse.config_path,
        synapse_url=env.synapse.url,
        workers=2,
        config={"s3_prune_interval": 1, "s3_prune_min_age": 0},
    ).start()
    try:
        deadline = time.monotonic() + 60
        while not (passes := [e for e in proxy.log_events() if e["event"] == "s3_prune.pass"]):
            assert time.monotonic() < deadline, "no s3_prune.pass event"
            time.sleep(0.05)
        first = passes[0]
        assert first["objects"] == len(doomed), first
        assert {p.get("process") for p in passes} == {"upkeep"}
        after = set(env.objects())
        assert not doomed & after
        assert env.keys_of(kept) <= after and stray in after
        assert first["unparseable"] >= 1
    finally:
        proxy.stop()
    env.seaweed.client().delete_object(Bucket=env.bucket, Key=stray)


def test_interrupted_prune_is_run_again(env: Env, s3_faults: FaultProxy) -> None:
    """SIGINT while a DeleteObjects answer is held: one line, exit 130, nothing of what
    Synapse lists touched; the next run finishes the job."""
    env.prune_all()
    kept = env.image(12)
    deleted = [env.image(13), env.image(14)]
    doomed = set().union(*(env.keys_of(m) for m in deleted))
    for media in deleted:
        env.delete_media(media)
    s3_faults.set_latency(60, match=lambda method, path: method == "POST" and "?delete" in path)
    argv = env.argv("prune", "--min-age", "0", "--batch-size", "1", endpoint=s3_faults.url)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not s3_faults.count("POST") and proc.poll() is None:
            assert time.monotonic() < deadline, "prune sent no DeleteObjects"
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (stdout, stderr)
    assert "interrupted; run the command again" in stderr
    # one line for the admin; everything else is a JSON log line
    assert [line for line in stderr.splitlines() if not line.startswith("{")] == [
        "media-proxy: interrupted; run the command again to continue"
    ], stderr
    left = doomed & set(env.objects())
    assert len(left) >= len(doomed) - 1  # at most the held batch went
    s3_faults.clear_faults()
    report = env.prune_all()
    assert report["objects"] == len(left)
    after = set(env.objects())
    assert not doomed & after and env.keys_of(kept) <= after


def test_prefix_is_respected(seaweed: SeaweedFS, tmp_path: Path) -> None:
    """With the provider's `prefix`, keys are read and deleted under it only: the same store
    path outside it (another tool's, another prefix sharing its first letters) is left."""
    s3 = replace(seaweed.create_bucket("lifecycle-prefix"), prefix="media/")
    synapse = Synapse(tmp_path / "synapse", server_name="prefix.test", s3=s3).start()
    try:
        token = synapse.register_user("p", "prefix-password")
        media_id = synapse.upload(token, b"hello", filename="a.txt").rsplit("/", 1)[1]
        client = seaweed.client()
        orphan = paths.local_media(random_id())
        outside = [orphan, f"mediax/{orphan}"]
        for key in [f"media/{orphan}", *outside]:
            client.put_object(Bucket=s3.bucket, Key=key, Body=b"o")
        argv = [
            sys.executable,
            "-m",
            "media_proxy",
            "s3",
            "prune",
            "--min-age",
            "0",
            "--json",
            "--synapse-config",
            str(synapse.config_path),
            "--log-format",
            "json",
        ]
        dry = subprocess.run(
            [a for a in argv if a != "--json"] + ["--dry-run"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        assert f"would delete local_originals media/{orphan} 1 media_row_gone" in dry.stdout
        result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
        report = json.loads(result.stdout.splitlines()[-1])
        keys = {o["Key"] for o in client.list_objects_v2(Bucket=s3.bucket).get("Contents", [])}
        assert keys == {f"media/{paths.local_media(media_id)}", *outside}
        assert report["objects"] == 1 and report["listed"] == 2
    finally:
        synapse.stop()
