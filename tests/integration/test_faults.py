"""Faults between real parts: S3 (SeaweedFS), Synapse and the disk failing under a running
`media-proxy serve`, and the defects a careful reviewer found on the serving path.

Faults are injected with the TCP fault proxy (tests/faults.py) in front of SeaweedFS or
Synapse, with a real tmpfs (full, read-only) under the cache, or by doing to the store what
Synapse itself does (rewriting a file in place). Each test asserts what the client saw, what
the store holds afterwards, and (through the autouse log check) that the proxy printed no
traceback. Waits are keyed to the test's own requests (request ids, stalled responses).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.postgres import PostgresDatabase
from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG, tmpfs
from tests.integration.media import (
    Answer,
    Media,
    bearer,
    evict,
    request,
    sql,
    store_file,
    stored_bytes,
    upload,
)

pytestmark = pytest.mark.integration

StartProxy = Callable[..., MediaProxy]


def wait_for(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.02)


@pytest.fixture
def start_proxy(
    synapse: Synapse, s3_faults: FaultProxy, devstack_dir: Path
) -> Iterator[StartProxy]:
    """Start a media-proxy of the test's own (S3 through the fault proxy, 1 s S3 timeouts);
    keyword arguments are config keys, `s3=` merges into the s3 section."""
    started: list[MediaProxy] = []

    def start(*, workers: int = 1, synapse_url: str | None = None, **config: Any) -> MediaProxy:
        s3 = {"endpoint_url": s3_faults.url, "timeout": 1.0, "read_timeout": 1.0}
        s3.update(config.pop("s3", {}))
        server = MediaProxy(
            devstack_dir / f"faults-{uuid.uuid4().hex[:8]}",
            synapse_config=synapse.config_path,
            synapse_url=synapse_url or synapse.url,
            workers=workers,
            config={**TEST_PROXY_CONFIG, **config, "s3": s3},
        ).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def new_media(synapse: Synapse, token: str, size: int, name: str) -> Media:
    return upload(synapse.url, token, os.urandom(size), name=name, server_name=synapse.server_name)


def get(server: MediaProxy, media: Media, token: str, *, rid: str = "", **kw: Any) -> Answer:
    headers = [*bearer(token), *([("X-Request-ID", rid)] if rid else []), *kw.pop("headers", [])]
    return request(server.url, media.client_path(), headers=headers, **kw)


def timed(fn: Callable[[], Answer]) -> tuple[Answer, float]:
    started = time.monotonic()
    answer = fn()
    return answer, time.monotonic() - started


def request_event(server: MediaProxy, rid: str) -> dict[str, Any]:
    """The request event the proxy logged for our request id (it is written right after the
    answer, so wait for it rather than for time)."""

    def find() -> dict[str, Any] | None:
        for event in server.log_events():
            if event.get("event") == "request" and event.get("request_id") == rid:
                return event
        return None

    event = wait_for(find)
    assert event is not None, f"no request event for {rid}"
    return event


def is_media_get(media: Media) -> Callable[[str, str], bool]:
    return lambda method, path: method == "GET" and media.rel in path


def fill_files(synapse: Synapse) -> list[Path]:
    fill_dir = synapse.media_store_path / paths.FILL_DIR
    return list(fill_dir.iterdir()) if fill_dir.exists() else []


# --- S3 failing ---------------------------------------------------------------------------


def test_s3_down_gives_502_at_once_and_hits_keep_flowing(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    server = start_proxy(s3={"timeout": 5})  # room for botocore's retry of a refusal
    missing = new_media(synapse, user_token, 300_000, "s3down.bin")
    present = new_media(synapse, user_token, 20_000, "present.bin")
    evict(synapse, missing)
    s3_faults.set_down(True)
    answer, took = timed(lambda: get(server, missing, user_token, rid="s3down-miss"))
    assert answer.status == 502, answer.body
    assert json.loads(answer.body)["errcode"] == "M_UNKNOWN"
    assert answer.header("content-type") == "application/json"
    assert took < 5
    assert not store_file(synapse, missing).exists() and fill_files(synapse) == []
    hit = get(server, present, user_token)
    assert hit.status == 200 and hit.body == present.data
    assert request_event(server, "s3down-miss")["source"] == "proxy"


def test_misses_share_one_kept_alive_s3_connection_and_replace_it_once_closed(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    """The proxy's own S3 client (http1.Pool) keeps its connection between misses; one that
    S3 closed while it was idle is replaced, and no miss fails for it."""
    server = start_proxy()
    media = [new_media(synapse, user_token, 5_000 + i, f"keepalive{i}.bin") for i in range(4)]
    for m in media:
        evict(synapse, m)
    s3_faults.reset()
    for m in media[:2]:
        answer = get(server, m, user_token)
        assert answer.status == 200 and answer.body == m.data
    assert s3_faults.count("GET") == 2 and s3_faults.connections == 1
    s3_faults.set_down(True)  # closes the idle connection under the proxy
    s3_faults.set_down(False)
    for i, m in enumerate(media[2:]):
        answer = get(server, m, user_token, rid=f"keepalive-{i}")
        assert answer.status == 200 and answer.body == m.data
        assert request_event(server, f"keepalive-{i}")["source"] == "s3"
    assert s3_faults.count("GET") == 4 and s3_faults.connections == 2


def test_s3_slow_first_byte_gives_504_within_the_timeout(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    server = start_proxy()
    media = new_media(synapse, user_token, 100_000, "slow.bin")
    evict(synapse, media)
    s3_faults.set_latency(30, match=is_media_get(media))
    answer, took = timed(lambda: get(server, media, user_token))
    assert answer.status == 504, answer.body
    assert json.loads(answer.body)["errcode"] == "M_UNKNOWN"
    assert took < 5
    s3_faults.clear_faults()
    assert not store_file(synapse, media).exists()
    again = get(server, media, user_token)
    assert again.status == 200 and again.body == media.data


def test_breaker_stops_asking_a_dead_s3(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    """After `breaker_threshold` failed GETs in a row the worker answers at once, without
    asking S3 (nor Synapse, whose provider would hang on the same S3)."""
    server = start_proxy(s3={"breaker_threshold": 2, "breaker_cooldown": 600})
    media = [new_media(synapse, user_token, 10_000, f"breaker{i}.bin") for i in range(5)]
    for m in media:
        evict(synapse, m)
    s3_faults.set_latency(30)
    s3_faults.reset()
    for m in media[:2]:
        assert get(server, m, user_token).status == 504
    asked = s3_faults.count("GET")
    assert asked >= 2
    for i, m in enumerate(media[2:]):
        answer, took = timed(lambda m=m, i=i: get(server, m, user_token, rid=f"brk-{i}"))  # type: ignore[misc]
        assert answer.status == 502 and took < 0.9
        assert request_event(server, f"brk-{i}")["source"] == "proxy"
    assert s3_faults.count("GET") == asked
    assert [e for e in server.log_events() if e["event"] == "s3.breaker_open"]


def test_s3_unavailable_synapse_passes_the_request_on(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    """`s3_unavailable: synapse`: Synapse answers (here its provider talks to SeaweedFS
    directly, so it can)."""
    server = start_proxy(s3_unavailable="synapse")
    media = new_media(synapse, user_token, 50_000, "to-synapse.bin")
    evict(synapse, media)
    s3_faults.set_down(True)
    answer = get(server, media, user_token, rid="s3-to-synapse")
    assert answer.status == 200 and answer.body == media.data
    assert request_event(server, "s3-to-synapse")["source"] == "synapse"


def test_s3_body_stalling_mid_stream_aborts_clients_and_leaves_no_file(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    server = start_proxy()
    media = new_media(synapse, user_token, 3 * 1024 * 1024, "stall.bin")
    evict(synapse, media)
    s3_faults.stall_after(1024 * 1024, match=is_media_get(media), times=1)
    answer, took = timed(lambda: get(server, media, user_token, rid="stall"))
    s3_faults.clear_faults()
    assert answer.status == 200 and not answer.complete
    assert len(answer.body) < len(media.data)
    assert took < 10
    event = request_event(server, "stall")
    assert event["aborted"] == "fill" and event["bytes"] < len(media.data)
    assert not store_file(synapse, media).exists()
    assert wait_for(lambda: fill_files(synapse) == [])
    again = get(server, media, user_token)
    assert again.status == 200 and again.body == media.data


# --- Synapse failing ----------------------------------------------------------------------


@pytest.fixture
def synapse_faults(synapse: Synapse) -> Iterator[FaultProxy]:
    host, port = synapse.url.removeprefix("http://").rsplit(":", 1)
    proxy = FaultProxy(host, int(port)).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def test_synapse_hanging_gives_504_and_down_502_while_cached_auth_keeps_hits_going(
    synapse: Synapse, user_token: str, synapse_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    server = start_proxy(
        synapse_url=synapse_faults.url, synapse_read_timeout=1.0, auth_cache_ttl=600
    )
    media = new_media(synapse, user_token, 30_000, "auth-cached.bin")
    assert get(server, media, user_token).status == 200  # the token's answer is now cached

    synapse_faults.set_latency(30)
    answer, took = timed(lambda: request(server.url, "/_matrix/media/v3/config"))
    assert answer.status == 504 and took < 5
    assert json.loads(answer.body)["errcode"] == "M_UNKNOWN"
    hit = get(server, media, user_token)
    assert hit.status == 200 and hit.body == media.data

    synapse_faults.clear_faults()
    synapse_faults.set_down(True)
    answer = request(server.url, "/_matrix/media/v3/config")
    assert answer.status == 502
    assert json.loads(answer.body)["errcode"] == "M_UNKNOWN"
    hit = get(server, media, user_token)
    assert hit.status == 200 and hit.body == media.data
    # A token the proxy never saw cannot be checked: Synapse is asked, and it is down.
    assert get(server, media, "unknown-token").status == 502


# --- bounded fills ------------------------------------------------------------------------


def test_fills_are_capped_per_client_address_and_per_worker(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    server = start_proxy(
        max_fills=2, max_fills_per_client=1, fill_wait=0.5, s3={"timeout": 30, "read_timeout": 30}
    )
    first, second, third = (
        new_media(synapse, user_token, 2 * 1024 * 1024, f"cap{i}.bin") for i in range(3)
    )
    for m in (first, second, third):
        evict(synapse, m)
    s3_faults.stall_after(256 * 1024, match=lambda method, path: method == "GET")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        running = pool.submit(get, server, first, user_token)
        s3_faults.wait_stalled(1)
        refused = get(server, second, user_token)
        assert refused.status == 429, refused.body
        assert json.loads(refused.body)["errcode"] == "M_LIMIT_EXCEEDED"
        assert refused.header("retry-after") == "1"
        # another address may start one
        other = pool.submit(
            get, server, second, user_token, headers=[("X-Forwarded-For", "192.0.2.1")]
        )
        s3_faults.wait_stalled(2)
        # the worker is at its cap of 2: a third address is refused with 503
        busy = get(server, third, user_token, headers=[("X-Forwarded-For", "192.0.2.2")])
        assert busy.status == 503, busy.body
        s3_faults.clear_faults()
        assert running.result().body == first.data
        assert other.result().body == second.data
    assert get(server, third, user_token).body == third.data  # slots are free again


# --- the disk -----------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "disk", "64m") as mount:
        yield mount


def test_read_only_cache_still_serves_verified_bytes_from_s3(
    synapse: Synapse, user_token: str, small_disk: Path, start_proxy: StartProxy
) -> None:
    server = start_proxy(cache_path=str(small_disk))
    media = new_media(synapse, user_token, 500_000, "ro.bin")
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    for i in range(2):
        answer = get(server, media, user_token, rid=f"ro-{i}")
        assert answer.status == 200 and answer.complete and answer.body == media.data
        assert request_event(server, f"ro-{i}")["source"] == "s3-uncached"
    assert not (small_disk / media.rel).exists()
    events = [e["event"] for e in server.log_events()]
    assert events.count("cache_fill.cannot_cache") == 1  # once per interval, not per request


def test_uncached_stream_verifies_sha256_before_the_last_byte(
    synapse: Synapse,
    user_token: str,
    small_disk: Path,
    seaweed: SeaweedFS,
    start_proxy: StartProxy,
) -> None:
    """No room to cache: the S3 stream is held to the fill's rules, so an object with the
    right size and other bytes never reaches a client as a clean 200."""
    server = start_proxy(cache_path=str(small_disk))
    media = new_media(synapse, user_token, 2 * 1024 * 1024, "tampered-uncached.bin")
    assert synapse.s3 is not None
    seaweed.client().put_object(
        Bucket=synapse.s3.bucket, Key=media.rel, Body=os.urandom(len(media.data))
    )
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    answer = get(server, media, user_token, rid="tampered-uncached")
    assert answer.status == 200 and not answer.complete
    assert len(answer.body) < len(media.data)
    assert request_event(server, "tampered-uncached")["aborted"] == "s3"


def test_store_file_shrinking_while_sent_aborts_the_connection(
    synapse: Synapse, user_token: str, start_proxy: StartProxy
) -> None:
    """Synapse rewrites store files in place: a file cut short mid-send must end in an
    aborted connection, never a short body on a connection left open."""
    server = start_proxy()
    media = new_media(synapse, user_token, 48 * 1024 * 1024, "shrink.bin")
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            f"GET {media.client_path()} HTTP/1.1\r\nHost: x\r\nX-Request-ID: shrink\r\n"
            f"Authorization: Bearer {user_token}\r\n\r\n".encode()
        )
        received = sock.recv(64 * 1024)
        assert received.startswith(b"HTTP/1.1 200")
        os.truncate(store_file(synapse, media), 1024 * 1024)  # as Synapse's open(path, "wb")
        total = len(received)
        try:
            while chunk := sock.recv(1024 * 1024):
                total += len(chunk)
        except ConnectionResetError:
            pass  # aborted: exactly what a client must see
    assert total < len(media.data)
    event = request_event(server, "shrink")
    assert event["aborted"] == "store" and event["source"] == "cache"
    # the short file counts as missing: the next request refills it from S3
    assert get(server, media, user_token).body == media.data
    assert stored_bytes(synapse, media) == media.data


def test_client_hanging_up_mid_body_is_one_event_without_traceback(
    synapse: Synapse, user_token: str, start_proxy: StartProxy
) -> None:
    server = start_proxy()
    media = new_media(synapse, user_token, 32 * 1024 * 1024, "hangup-hit.bin")
    for rid, evicted in (("hangup-hit", False), ("hangup-miss", True)):
        if evicted:
            evict(synapse, media)
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            sock.sendall(
                f"GET {media.client_path()} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {rid}\r\n"
                f"Authorization: Bearer {user_token}\r\n\r\n".encode()
            )
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        event = request_event(server, rid)
        assert event["aborted"] == "client"
        assert event["source"] == ("s3" if evicted else "cache")
        assert event["status"] == 200 and 0 <= event["bytes"] < len(media.data)


# --- processes ----------------------------------------------------------------------------


def _lock_holder(path: Path) -> int | None:
    """The pid holding a flock on `path`, from /proc/locks."""
    inode = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and fields[-3].rsplit(":", 1)[-1] == str(inode):
            return int(fields[-4])
    return None


def test_kill_9_of_a_fill_leader_leaves_no_partial_file(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    server = start_proxy(workers=3, s3={"timeout": 30, "read_timeout": 30})
    media = new_media(synapse, user_token, 6 * 1024 * 1024, "kill9.bin")
    evict(synapse, media)
    s3_faults.stall_after(2 * 1024 * 1024, match=is_media_get(media), times=1)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = [pool.submit(get, server, media, user_token) for _ in range(6)]
        s3_faults.wait_stalled(1)
        fill = synapse.media_store_path / paths.FILL_DIR / paths.fill_name(media.rel)
        leader = wait_for(lambda: fill.exists() and _lock_holder(fill))
        assert leader, "no process holds the fill's lock"
        os.kill(leader, signal.SIGKILL)
        results = []
        for pending in answers:
            # a connection held by the killed process itself is closed without an answer
            with contextlib.suppress(http.client.RemoteDisconnected):
                results.append(pending.result())
    s3_faults.clear_faults()
    for answer in results:
        assert answer.status == 200
        assert not answer.complete or answer.body == media.data  # never a wrong clean body
    stored = store_file(synapse, media)
    assert not stored.exists() or stored.read_bytes() == media.data
    again = get(server, media, user_token)
    assert again.status == 200 and again.body == media.data
    assert stored_bytes(synapse, media) == media.data
    assert wait_for(lambda: fill_files(synapse) == [])


def test_sigterm_stops_accepting_and_ends_within_the_grace_period(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, start_proxy: StartProxy
) -> None:
    server = start_proxy(shutdown_grace=2, s3={"timeout": 30, "read_timeout": 30})
    media = new_media(synapse, user_token, 2 * 1024 * 1024, "sigterm.bin")
    evict(synapse, media)
    s3_faults.stall_after(512 * 1024, match=is_media_get(media), times=1)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(get, server, media, user_token)
        s3_faults.wait_stalled(1)
        assert server.process is not None
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        answer = running.result(timeout=30)
        server.process.popen.wait(timeout=30)
        took = time.monotonic() - started
    s3_faults.clear_faults()
    assert took < 2 + 5
    assert answer.status == 200 and not answer.complete  # aborted at the end of the grace
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
    assert not store_file(synapse, media).exists()


# --- the database -------------------------------------------------------------------------


@pytest.mark.parametrize("synapse", ["postgres"], indirect=True)
def test_database_hanging_or_down_sends_requests_to_synapse_and_access_times_resume(
    synapse: Synapse, user_token: str, start_proxy: StartProxy
) -> None:
    """Undecidable requests (no row within `database_timeout`) go to Synapse, never served
    unchecked; the access-time flusher survives the outage and writes again afterwards."""
    db = synapse.database
    assert isinstance(db, PostgresDatabase)
    token = user_token
    with FaultProxy(db.host, db.port) as pg_faults:
        server = start_proxy(
            database={
                "name": "psycopg2",
                "args": {
                    "host": pg_faults.host,
                    "port": pg_faults.port,
                    "user": db.user,
                    "dbname": db.database,
                    **({"password": db.password} if db.password else {}),
                },
            },
            database_timeout=1.0,
        )
        media = [new_media(synapse, token, 20_000, f"db{i}.bin") for i in range(3)]

        pg_faults.hang()
        answer, took = timed(lambda: get(server, media[0], token, rid="db-hang"))
        assert answer.status == 200 and answer.body == media[0].data
        assert took < 5
        assert request_event(server, "db-hang")["source"] == "synapse"

        pg_faults.clear_faults()
        pg_faults.set_down(True)
        answer = get(server, media[1], token, rid="db-down")
        assert answer.status == 200 and answer.body == media[1].data
        assert request_event(server, "db-down")["source"] == "synapse"

        pg_faults.clear_faults()
        sql(
            synapse,
            "UPDATE local_media_repository SET last_access_ts = 1 WHERE media_id = ?",
            media[2].media_id,
        )

        def served_by_the_proxy() -> bool:  # the pool reconnects on its first use
            rid = f"db-back-{uuid.uuid4().hex[:6]}"
            answer = get(server, media[2], token, rid=rid)
            assert answer.body == media[2].data
            return request_event(server, rid)["source"] == "cache"

        assert wait_for(served_by_the_proxy)

        def accessed() -> bool:
            rows = sql(
                synapse,
                "SELECT last_access_ts FROM local_media_repository WHERE media_id = ?",
                media[2].media_id,
            )
            return bool(rows and rows[0][0] and rows[0][0] > 1)

        assert wait_for(accessed)


def test_a_dead_leaders_fill_file_is_never_followed(
    synapse: Synapse, user_token: str, start_proxy: StartProxy
) -> None:
    """A crashed leader's partial fill file, locked for a moment by a process breaking it:
    a request must not start a 200 from those bytes (it would end in an abort); it waits for
    a live leader's growth, and when the breaker is done it leads the fill itself."""
    server = start_proxy()
    media = new_media(synapse, user_token, 1024 * 1024, "stale-leader.bin")
    evict(synapse, media)
    name = synapse.media_store_path / paths.FILL_DIR / paths.fill_name(media.rel)
    name.write_bytes(media.data[:300_000])  # what the dead leader had written
    with name.open("rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # the breaker (another process) holds it
        assert server.process is not None
        worker = server.process.pid

        def following() -> bool:  # the worker opened the fill file: it is watching it
            for fd in Path(f"/proc/{worker}/fd").iterdir():
                with contextlib.suppress(OSError):  # closed meanwhile
                    if os.readlink(fd) == str(name):
                        return True
            return False

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(get, server, media, user_token, rid="stale-leader")
            assert wait_for(following)
            name.unlink()  # the breaker's work: unlink under the lock, then let go
            fcntl.flock(held, fcntl.LOCK_UN)
            answer = pending.result()
    assert answer.status == 200 and answer.complete and answer.body == media.data
    assert request_event(server, "stale-leader")["source"] == "s3"
    assert stored_bytes(synapse, media) == media.data
