"""Both serving loops (`event_loop: asyncio`, the default, and `uvloop`) send whole files
zero-copy to slow readers, hits and misses alike, and end a stalled client's answer on stop.

uvloop has no loop.sendfile: the proxy waits for writability itself (respond.py), on a
duplicate of the socket's descriptor. A slow reader makes those waits happen many times.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.proxy import MediaProxy
from devstack.synapse import Synapse
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Media, evict, stored_bytes, upload

pytestmark = pytest.mark.integration

SIZE = 8 * 1024 * 1024


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def looped(
    request: pytest.FixtureRequest, synapse: Synapse, s3_proxy: FaultProxy, devstack_dir: Path
) -> Iterator[MediaProxy]:
    server = MediaProxy(
        devstack_dir / f"media-proxy-loop-{request.param}-{synapse.server_name}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={
            **TEST_PROXY_CONFIG,
            "s3": {"endpoint_url": s3_proxy.url},
            "event_loop": request.param,
            "shutdown_grace": 1,
        },
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def big(synapse: Synapse, user_token: str) -> Media:
    return upload(
        synapse.url, user_token, os.urandom(SIZE), name="loop.bin", server_name=synapse.server_name
    )


def uses_uvloop(server: MediaProxy) -> bool:
    assert server.process is not None
    return "uvloop" in Path(f"/proc/{server.process.pid}/maps").read_text()


def ask(server: MediaProxy, media: Media, token: str, rid: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # the sender fills it soon
    sock.sendall(
        f"GET {media.client_path()} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        f"X-Request-ID: {rid}\r\nConnection: close\r\n\r\n".encode()
    )
    return sock


def read_slowly(sock: socket.socket) -> tuple[bytes, bytes]:
    """Head and body, read 16 KiB at a time with short pauses (hundreds of full sockets)."""
    data = bytearray()
    reads = 0
    while chunk := sock.recv(16 * 1024):
        data += chunk
        reads += 1
        if reads % 16 == 0:
            time.sleep(0.002)
    sock.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body


def request_event(server: MediaProxy, rid: str, timeout: float = 15.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        for e in server.log_events():
            if e.get("event") == "request" and e.get("request_id") == rid:
                return e
        assert time.monotonic() < deadline, f"no request event for {rid}"
        time.sleep(0.02)


def test_the_configured_loop_serves(looped: MediaProxy) -> None:
    wanted = looped.config["event_loop"] == "uvloop"
    assert uses_uvloop(looped) == wanted


def test_slow_reader_gets_the_whole_hit_and_miss(
    synapse: Synapse, looped: MediaProxy, user_token: str, big: Media
) -> None:
    tag = uuid.uuid4().hex[:8]
    evict(synapse, big)
    head, body = read_slowly(ask(looped, big, user_token, f"{tag}-miss"))
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {SIZE}".encode() in head
    assert body == big.data
    assert stored_bytes(synapse, big) == big.data  # written back
    head, body = read_slowly(ask(looped, big, user_token, f"{tag}-hit"))
    assert head.startswith(b"HTTP/1.1 200") and body == big.data
    assert request_event(looped, f"{tag}-miss")["source"] == "s3"
    hit = request_event(looped, f"{tag}-hit")
    assert (hit["source"], hit["status"], hit["bytes"]) == ("cache", 200, SIZE)


def test_client_hanging_up_mid_body_is_one_event(
    looped: MediaProxy, user_token: str, big: Media
) -> None:
    rid = f"{uuid.uuid4().hex[:8]}-gone"
    sock = ask(looped, big, user_token, rid)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # a reset, with most of the body unsent
    event = request_event(looped, rid)
    assert event["aborted"] == "client" and event["source"] == "cache"
    assert isinstance(event["bytes"], int) and event["bytes"] < SIZE


def test_stop_ends_a_stalled_answer(
    synapse: Synapse, s3_proxy: FaultProxy, user_token: str, big: Media, tmp_path: Path
) -> None:
    """A client that stops reading mid-body does not hold the stop past the grace period,
    whichever loop serves it (the stop is the test's last step, so its own proxy)."""
    for loop in ("uvloop", "asyncio"):
        server = MediaProxy(
            tmp_path / loop,
            synapse_config=synapse.config_path,
            synapse_url=synapse.url,
            config={
                **TEST_PROXY_CONFIG,
                "s3": {"endpoint_url": s3_proxy.url},
                "event_loop": loop,
                "shutdown_grace": 1,
            },
        ).start()
        rid = f"{uuid.uuid4().hex[:8]}-stalled"
        sock = ask(server, big, user_token, rid)
        try:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # then no more reads
            assert server.process is not None
            assert server.process.stop(timeout=30) == 0  # not killed
            event = request_event(server, rid)
            assert (event["status"], event.get("aborted")) == (200, "shutdown")
        finally:
            sock.close()
            server.stop()
