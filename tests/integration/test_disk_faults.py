"""Disk faults under a running `media-proxy serve`: the cache is Synapse's real media store
seen through tests/faultfs.py (a FUSE passthrough mount that injects EIO, ENOSPC or a
refused hard link), S3 is real SeaweedFS behind the fault proxy.

Asserted each time: what the client saw (a verified body, or an aborted connection, never a
wrong or short clean answer and never a second response on the same connection), what the
store holds afterwards (nothing partial), and one log event rather than one per request.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devstack.proxy import MediaProxy
from devstack.synapse import Synapse
from media_proxy import paths
from tests.faultfs import FaultFS
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Answer, Media, bearer, evict, request, store_file, upload
from tests.integration.test_faults import request_event, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def faulty_store(synapse: Synapse, tmp_path: Path) -> Iterator[FaultFS]:
    mount = tmp_path / "store"
    mount.mkdir()
    fs = FaultFS(backing=synapse.media_store_path, mountpoint=mount)
    try:
        fs.start()
    except Exception as e:  # no FUSE on this machine
        pytest.skip(f"cannot mount a FUSE filesystem here: {e}")
    try:
        yield fs
    finally:
        fs.stop()


@pytest.fixture
def disk_proxy(
    synapse: Synapse, s3_faults: FaultProxy, faulty_store: FaultFS, devstack_dir: Path
) -> Iterator[MediaProxy]:
    server = MediaProxy(
        devstack_dir / f"disk-faults-{uuid.uuid4().hex[:8]}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={
            **TEST_PROXY_CONFIG,
            "cache_path": str(faulty_store.mountpoint),
            "s3": {"endpoint_url": s3_faults.url},
        },
    ).start()
    yield server
    server.stop()


def new_media(synapse: Synapse, token: str, size: int, name: str) -> Media:
    return upload(synapse.url, token, os.urandom(size), name=name, server_name=synapse.server_name)


def get(server: MediaProxy, media: Media, token: str, rid: str) -> Answer:
    return request(server.url, media.client_path(), headers=[*bearer(token), ("X-Request-ID", rid)])


def raw_get(server: MediaProxy, media: Media, token: str, rid: str) -> bytes:
    """Everything the server sends on one connection until it closes it (or resets it)."""
    received = b""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            f"GET {media.client_path()} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {rid}\r\n"
            f"Connection: keep-alive\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        try:
            while chunk := sock.recv(1024 * 1024):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def fill_files(synapse: Synapse) -> list[Path]:
    fill_dir = synapse.media_store_path / paths.FILL_DIR
    return list(fill_dir.iterdir()) if fill_dir.exists() else []


def events(server: MediaProxy, name: str) -> list[dict[str, Any]]:
    return [e for e in server.log_events() if e["event"] == name]


def test_read_error_mid_send_aborts_and_never_answers_twice(
    synapse: Synapse, user_token: str, faulty_store: FaultFS, disk_proxy: MediaProxy
) -> None:
    """EIO from sendfile after the headers went out: the connection is aborted; before the
    fix the proxy passed the request to Synapse and wrote its whole answer after ours."""
    media = new_media(synapse, user_token, 8 * 1024 * 1024, "eio-read.bin")
    faulty_store.fail_reads(match=media.rel, after=1024 * 1024)
    stream = raw_get(disk_proxy, media, user_token, "eio-read")
    assert faulty_store.hits().get("read", 0) >= 1
    head, _, body = stream.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert stream.count(b"HTTP/1.1 ") == 1  # one response, not a second one after it
    assert len(body) < len(media.data)
    assert media.data.startswith(body)  # what came is right, it is only short
    event = request_event(disk_proxy, "eio-read")
    assert event["aborted"] == "store" and event["source"] == "cache"
    faulty_store.clear()
    assert get(disk_proxy, media, user_token, "eio-read-after").body == media.data


def test_read_error_on_a_small_hit_aborts_before_any_byte(
    synapse: Synapse, user_token: str, faulty_store: FaultFS, disk_proxy: MediaProxy
) -> None:
    """A small hit is read before its headers go out (they leave in one write with the
    body): EIO there aborts the connection with nothing sent, never a short clean 200 and
    never Synapse's answer after ours."""
    media = new_media(synapse, user_token, 3000, "eio-small.bin")
    faulty_store.fail_reads(match=media.rel)
    stream = raw_get(disk_proxy, media, user_token, "eio-small")
    assert faulty_store.hits().get("read", 0) >= 1
    assert stream == b""
    event = request_event(disk_proxy, "eio-small")
    assert event["aborted"] == "store" and event["source"] == "cache"
    assert event["status"] == 499 and event["bytes"] == 0  # no status went out
    faulty_store.clear()
    answer = get(disk_proxy, media, user_token, "eio-small-after")
    assert answer.status == 200 and answer.body == media.data


def test_write_error_mid_fill_aborts_then_misses_stream_uncached(
    synapse: Synapse, user_token: str, faulty_store: FaultFS, disk_proxy: MediaProxy
) -> None:
    first, second = (new_media(synapse, user_token, 3 * 1024 * 1024, f"eio-w{i}.bin") for i in "12")
    for media in (first, second):
        evict(synapse, media)
    # no block reservation (as on filesystems without fallocate), so the writes themselves fail
    faulty_store.fail_op("fallocate", errno=errno.EOPNOTSUPP)
    faulty_store.fail_writes(match=paths.FILL_DIR, after=1024 * 1024, errno=errno.EIO)
    broken = get(disk_proxy, first, user_token, "eio-write-1")
    assert broken.status == 200 and not broken.complete  # promised bytes could not be kept
    assert first.data.startswith(broken.body)
    assert request_event(disk_proxy, "eio-write-1")["aborted"] == "fill"
    # the disk failed a moment ago: the next misses are streamed uncached, verified
    for i in range(2):
        answer = get(disk_proxy, second, user_token, f"eio-write-next-{i}")
        assert answer.status == 200 and answer.complete and answer.body == second.data
        assert request_event(disk_proxy, f"eio-write-next-{i}")["source"] == "s3-uncached"
    assert not store_file(synapse, first).exists() and not store_file(synapse, second).exists()
    assert wait_for(lambda: fill_files(synapse) == [])
    assert len(events(disk_proxy, "cache_fill.cannot_cache")) == 1  # one per interval


def test_write_error_on_the_first_bytes_streams_uncached(
    synapse: Synapse, user_token: str, faulty_store: FaultFS, disk_proxy: MediaProxy
) -> None:
    media = new_media(synapse, user_token, 2 * 1024 * 1024, "eio-w0.bin")
    evict(synapse, media)
    faulty_store.fail_op("fallocate", errno=errno.EOPNOTSUPP)
    faulty_store.fail_writes(match=paths.FILL_DIR, after=0, errno=errno.EIO)
    answer = get(disk_proxy, media, user_token, "eio-first")
    assert answer.status == 200 and answer.complete and answer.body == media.data
    assert request_event(disk_proxy, "eio-first")["source"] == "s3-uncached"
    assert not store_file(synapse, media).exists()
    assert wait_for(lambda: fill_files(synapse) == [])


def test_only_large_fills_reserve_their_blocks(
    synapse: Synapse, user_token: str, faulty_store: FaultFS, disk_proxy: MediaProxy
) -> None:
    """A large fill reserves its blocks (fallocate) before a byte is promised, and a refused
    reservation streams the file uncached; a small one (up to 64 KiB) asks for none: it is
    written whole, in one write that fails as early (next test)."""
    large = new_media(synapse, user_token, 2 * 1024 * 1024, "reserve-large.bin")
    small = new_media(synapse, user_token, 40_000, "reserve-small.bin")
    evict(synapse, large)
    evict(synapse, small)
    faulty_store.fail_op("fallocate", match=paths.FILL_DIR, errno=errno.ENOSPC)
    answer = get(disk_proxy, large, user_token, "reserve-large")
    assert answer.status == 200 and answer.complete and answer.body == large.data
    assert request_event(disk_proxy, "reserve-large")["source"] == "s3-uncached"
    assert faulty_store.hits().get("fallocate") == 1
    answer = get(disk_proxy, small, user_token, "reserve-small")
    assert answer.status == 200 and answer.complete and answer.body == small.data
    assert request_event(disk_proxy, "reserve-small")["source"] == "s3"  # filled, not refused
    assert faulty_store.hits().get("fallocate") == 1
    # (The fill's fstat after the answer fails on this FUSE mount, whose path-based getattr
    # cannot reach an inode whose first name was unlinked: the file is not kept here.)


def test_a_small_fill_whose_one_write_fails_streams_uncached(
    synapse: Synapse, user_token: str, faulty_store: FaultFS, disk_proxy: MediaProxy
) -> None:
    small = new_media(synapse, user_token, 40_000, "small-enospc.bin")
    evict(synapse, small)
    faulty_store.fail_writes(match=paths.FILL_DIR, after=0, errno=errno.ENOSPC)
    answer = get(disk_proxy, small, user_token, "small-enospc")
    assert answer.status == 200 and answer.complete and answer.body == small.data
    assert request_event(disk_proxy, "small-enospc")["source"] == "s3-uncached"
    assert faulty_store.hits().get("write") == 1  # one write: the whole body at once
    assert not store_file(synapse, small).exists()
    assert wait_for(lambda: fill_files(synapse) == [])


def test_no_hard_links_streams_uncached_without_leaking_descriptors(
    synapse: Synapse, user_token: str, faulty_store: FaultFS, disk_proxy: MediaProxy
) -> None:
    """A filesystem without hard links (the fill protocol's `link` refused): every miss is
    streamed from S3, verified, and leaves neither a descriptor nor a private file behind."""
    media = new_media(synapse, user_token, 300_000, "nolink.bin")
    evict(synapse, media)
    faulty_store.fail_op("link", errno=errno.EPERM)
    assert disk_proxy.process is not None
    pid = disk_proxy.process.pid  # one worker: the server process itself
    answer = get(disk_proxy, media, user_token, "nolink-0")  # warm up pools and caches
    assert answer.body == media.data
    descriptors = len(os.listdir(f"/proc/{pid}/fd"))
    for i in range(1, 6):
        answer = get(disk_proxy, media, user_token, f"nolink-{i}")
        assert answer.status == 200 and answer.complete and answer.body == media.data
        assert request_event(disk_proxy, f"nolink-{i}")["source"] == "s3-uncached"
    assert faulty_store.hits().get("link", 0) >= 1
    assert len(os.listdir(f"/proc/{pid}/fd")) <= descriptors + 2  # a leak: one per miss
    assert fill_files(synapse) == []
    assert not store_file(synapse, media).exists()
