"""What an administrator operates: `media-proxy check`, the request log, a read-only database,
S3 unreachable — against the real Synapse, SeaweedFS and PostgreSQL of the session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack import Postgres, SeaweedFS, Synapse
from devstack.postgres import PostgresDatabase
from devstack.proxy import MediaProxy
from devstack.seaweed import WEED_TMP
from tests.integration.conftest import TEST_PROXY_CONFIG, tmpfs
from tests.integration.media import (
    Media,
    bearer,
    complete_file,
    evict,
    request,
    store_file,
    stored_bytes,
    upload,
)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "media_proxy", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_check_passes_on_a_working_stack(synapse: Synapse) -> None:
    result = run_cli(
        "check", "--synapse-config", str(synapse.config_path), "--synapse-url", synapse.url
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert [line.split()[1].rstrip(":") for line in lines] == [
        "homeserver.yaml",
        "database",
        "s3",
        "cache",
        "synapse",
    ]
    assert all(line.startswith("ok") for line in lines)
    assert "last_access_ts writable" in result.stdout
    assert synapse.s3 is not None and synapse.s3.secret_key not in result.stdout  # masked


def test_check_names_what_fails(synapse: Synapse, tmp_path: Path) -> None:
    own = tmp_path / "proxy.yaml"
    own.write_text(yaml.safe_dump({"s3": {"secret_access_key": "wrong-secret"}}))
    result = run_cli(
        "check",
        "--config",
        str(own),
        "--synapse-config",
        str(synapse.config_path),
        "--synapse-url",
        "http://127.0.0.1:9",
    )
    assert result.returncode == 1
    failed = {
        line.split()[1].rstrip(":")
        for line in result.stdout.splitlines()
        if line.startswith("FAIL")
    }
    assert failed == {"s3", "synapse"}
    assert "wrong-secret" not in result.stdout


def test_check_changes_nothing_and_says_what_does_not_exist(
    synapse_sqlite: Synapse, tmp_path: Path
) -> None:
    """A wrong database path or cache folder is reported, never created (SQLite would create
    an empty database, then report "no such table")."""
    database, cache = tmp_path / "typo.db", tmp_path / "no-cache"
    own = tmp_path / "proxy.yaml"
    own.write_text(
        yaml.safe_dump(
            {
                "database": {"name": "sqlite3", "args": {"database": str(database)}},
                "cache_path": str(cache),
            }
        )
    )
    result = run_cli(
        "check",
        "--config",
        str(own),
        "--synapse-config",
        str(synapse_sqlite.config_path),
        "--synapse-url",
        synapse_sqlite.url,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failed = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == [
        f"FAIL  database: {database} does not exist",
        f"FAIL  cache: {cache} does not exist",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proxy.yaml"]


def test_bad_config_is_one_line_and_status_2(synapse: Synapse, tmp_path: Path) -> None:
    own = tmp_path / "proxy.yaml"
    own.write_text("workers: many\n")
    result = run_cli(
        "serve",
        "--config",
        str(own),
        "--synapse-config",
        str(synapse.config_path),
        "--synapse-url",
        synapse.url,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"media-proxy: configuration error: {own}: workers: expected a number >= 1, got 'many'"
    ]


def media_requests(
    proxy: MediaProxy, media: Media, count: int, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """The proxy's `request` events for `media`, once there are `count` of them (each is
    logged just after its answer), or as they are when the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        found = [
            e
            for e in proxy.log_events()
            if e.get("event") == "request" and e.get("media_id") == media.media_id
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def test_one_log_event_per_request_and_no_secrets(
    synapse: Synapse, proxy: MediaProxy, user_token: str
) -> None:
    media = upload(
        synapse.url, user_token, os.urandom(3000), name="log.bin", server_name=synapse.server_name
    )
    evict(synapse, media)
    request(proxy.url, media.client_path(f"?access_token={user_token}"))
    # the fill renames its file into place just after the verified last byte
    assert stored_bytes(synapse, media) == media.data
    request(proxy.url, media.client_path(), headers=bearer(user_token))
    requests = media_requests(proxy, media, 2)
    text = proxy.log_path.read_text()
    assert user_token not in text
    assert synapse.s3 is not None and synapse.s3.secret_key not in text
    assert [e["source"] for e in requests] == ["s3", "cache"]
    for event in requests:
        assert event["status"] == 200 and event["bytes"] == 3000
        assert event["route"] == "client-download"
        assert {"request_id", "media_id", "ms", "method", "path", "timestamp"} <= set(event)


def test_read_only_database_is_reported_once_and_serving_goes_on(
    synapse_postgres: Synapse, postgres: Postgres, tmp_path: Path
) -> None:
    db = synapse_postgres.database
    assert isinstance(db, PostgresDatabase)
    postgres.psql("DROP ROLE IF EXISTS reader; CREATE ROLE reader LOGIN;", database=db.database)
    postgres.psql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader;", database=db.database)
    token = synapse_postgres.register_user("readonly-check", "pw")
    media = upload(
        synapse_postgres.url,
        token,
        os.urandom(5000),
        name="ro.bin",
        server_name=synapse_postgres.server_name,
    )
    reader = MediaProxy(
        tmp_path,
        synapse_config=synapse_postgres.config_path,
        synapse_url=synapse_postgres.url,
        workers=1,
        config={
            **TEST_PROXY_CONFIG,
            "database": {
                "name": "psycopg2",
                "args": {
                    "user": "reader",
                    "host": db.host,
                    "port": db.port,
                    "database": db.database,
                },
            },
        },
    ).start()
    try:
        evict(synapse_postgres, media)
        answer = request(reader.url, media.client_path(), headers=bearer(token))
        assert answer.status == 200 and answer.body == media.data
        assert stored_bytes(synapse_postgres, media) == media.data
        time.sleep(1.0)  # a flush interval passes without errors
        events = reader.log_events()
        assert [e["event"] for e in events].count("database.read_only") == 1
        assert not [e for e in events if e["event"] == "access_times.flush_failed"]
    finally:
        reader.stop()


@pytest.mark.parametrize("workers", [2])
def test_sigterm_stops_every_worker(synapse: Synapse, tmp_path: Path, workers: int) -> None:
    server = MediaProxy(
        tmp_path, synapse_config=synapse.config_path, synapse_url=synapse.url, workers=workers
    ).start()
    assert server.process is not None
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == workers
    assert server.process.stop(timeout=10) == 0
    assert not any(Path(f"/proc/{c}").exists() for c in children)


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("workers", [1, 3])
def test_group_signal_is_a_clean_stop(
    synapse_sqlite: Synapse, tmp_path: Path, stop_signal: signal.Signals, workers: int
) -> None:
    """Ctrl-C on a terminal and `systemctl stop` signal every process of the group at once:
    the workers get the signal from there and again from the supervisor."""
    server = MediaProxy(
        tmp_path,
        synapse_config=synapse_sqlite.config_path,
        synapse_url=synapse_sqlite.url,
        workers=workers,
    ).start()
    assert server.process is not None
    pid = server.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == (workers if workers > 1 else 0)  # one worker: no supervisor
    os.killpg(pid, stop_signal)  # the proxy leads its own session (ManagedProcess)
    assert server.process.popen.wait(timeout=20) == 0
    assert not any(Path(f"/proc/{c}").exists() for c in children)
    lines = [
        line
        for line in server.log_path.read_text().splitlines()
        if not line.startswith("=== ")  # ManagedProcess's own start line
    ]
    assert "Traceback" not in "\n".join(lines)
    events = [json.loads(line) for line in lines]  # every line is one JSON event
    assert [e for e in events if e["level"] not in ("debug", "info")] == []
    assert [e["event"] for e in events].count("server.stop") == 1


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a cache disk that a 3 MiB file cannot fit on."""
    with tmpfs(tmp_path / "tiny", "2m") as mount:
        yield mount


def test_full_disk_serves_from_s3_uncached(
    synapse: Synapse, user_token: str, tiny_disk: Path, tmp_path: Path
) -> None:
    media = upload(
        synapse.url,
        user_token,
        os.urandom(3 * 1024 * 1024),
        name="huge.bin",
        server_name=synapse.server_name,
    )
    small = upload(
        synapse.url,
        user_token,
        os.urandom(100_000),
        name="fits.bin",
        server_name=synapse.server_name,
    )
    server = MediaProxy(
        tmp_path / "proxy",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={**TEST_PROXY_CONFIG, "cache_path": str(tiny_disk)},
    ).start()
    try:
        for _ in range(2):
            answer = request(server.url, media.client_path(), headers=bearer(user_token))
            assert answer.status == 200 and answer.complete and answer.body == media.data
        assert not (tiny_disk / media.rel).exists()
        assert not any((tiny_disk / ".media-proxy" / "fill").iterdir())  # nothing partial
        # a file that fits is still cached on the same disk
        assert (
            request(server.url, small.client_path(), headers=bearer(user_token)).body == small.data
        )
        assert complete_file(tiny_disk / small.rel, len(small.data)) == small.data
        sources = [e["source"] for e in media_requests(server, media, 2)]
        events = server.log_events()
        assert [e["event"] for e in events].count("cache_fill.no_space") == 1  # once a minute
        assert sources == ["s3-uncached", "s3-uncached"]
    finally:
        server.stop()


def test_separate_cache_path_when_synapse_keeps_no_local_store(
    synapse: Synapse, user_token: str, tmp_path: Path
) -> None:
    """With `enable_local_media_storage: false` Synapse has no store: the proxy caches in its
    own `cache_path`, never in Synapse's media_store_path. (Synapse 1.163 with the S3 provider
    cannot upload in that mode — the provider reads the file from media_store_path — so the
    homeserver here keeps its store and the flag is set in the proxy's own config.)"""
    media = upload(
        synapse.url,
        user_token,
        os.urandom(70_000),
        name="own-cache.bin",
        server_name=synapse.server_name,
    )
    evict(synapse, media)
    cache = tmp_path / "cache"
    server = MediaProxy(
        tmp_path / "proxy",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={**TEST_PROXY_CONFIG, "enable_local_media_storage": False, "cache_path": str(cache)},
    ).start()
    try:
        for _ in range(2):
            answer = request(server.url, media.client_path(), headers=bearer(user_token))
            assert answer.status == 200 and answer.body == media.data
            # the fill renames its file into place just after the verified last byte
            assert complete_file(cache / media.rel, len(media.data)) == media.data
        assert not store_file(synapse, media).exists()
        assert [e["source"] for e in media_requests(server, media, 2)] == ["s3", "cache"]
    finally:
        server.stop()


def test_seaweedfs_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    """weed's logs and sockets stay in its work dir; the gRPC sockets it hard-codes into /tmp
    are removed when it stops. Other runs share /tmp: only names carrying this weed's ports
    or PID count."""
    weed = SeaweedFS(tmp_path / "seaweedfs")
    ports = [weed.master_port, weed.volume_port, weed.filer_port, weed.s3_port]
    ports += [port + 10000 for port in ports]  # the gRPC ports

    def its_files(pid: int) -> set[str]:
        return {
            name
            for name in os.listdir(WEED_TMP)
            if (name.startswith("seaweedfs-") and any(f"-{p}.sock" in name for p in ports))
            or (name.startswith("weed.") and name.endswith(f".{pid}"))  # glog's file names
        }

    weed.start()
    try:
        assert weed.process is not None
        pid = weed.process.pid
        # the key finds what weed puts there: its gRPC sockets, and nothing else
        assert its_files(pid) == {path.name for path in weed.grpc_sockets()}
        assert {"filer.sock", "s3.sock"} <= {p.name for p in weed.socket_dir.iterdir()}
    finally:
        weed.stop()
    assert its_files(pid) == set()
