"""http1: the S3 GET client's framing and keep-alive rules.

Response heads are parsed as pure functions; the pool and body reading run over real
loopback sockets against a peer that plays scripted bytes (the framings SeaweedFS never
sends: chunked bodies, early closes, `Connection: close`). Against SeaweedFS itself the
client is exercised by every integration test with a miss.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from media_proxy import http1


@pytest.mark.parametrize(
    ("raw", "status", "length", "chunked", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", 200, 5, False, True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n", 200, 5, False, True),
        (b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: Chunked\r\n\r\n", 404, None, True, True),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            200,
            1,
            False,
            False,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", 200, 1, False, False),
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
            200,
            1,
            False,
            True,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", 200, None, False, False),  # ends when the server closes
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, 0, False, True),
        (b"HTTP/1.1 100 Continue\r\n\r\n", 100, 0, False, True),
        (b"HTTP/1.1 500\r\nContent-Length: 0\r\n\r\n", 500, 0, False, True),  # no reason phrase
    ],
)
def test_a_head_says_status_framing_and_keep_alive(
    raw: bytes, status: int, length: int | None, chunked: bool, keep_alive: bool
) -> None:
    head = http1.parse_head(raw)
    assert (head.status, head.length, head.chunked, head.keep_alive) == (
        status,
        length,
        chunked,
        keep_alive,
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n",
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",  # no length: still no body, and the connection is kept
    ],
)
def test_the_answer_to_a_head_has_no_body(raw: bytes) -> None:
    head = http1.parse_head(raw, to_head=True)
    assert (head.length, head.chunked, head.keep_alive) == (0, False, True)
    if b"1048576" in raw:
        assert head.headers["content-length"] == "1048576"  # the object's size, as sent


def test_header_names_are_lower_cased_and_repeats_joined() -> None:
    head = http1.parse_head(b'HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a:  2 \r\nETag: "e"\r\n\r\n')
    assert head.headers == {"x-a": "1, 2", "etag": '"e"'}


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : 1\r\n\r\n",  # whitespace before the colon (RFC 9112 5.1)
        b"HTTP/1.1 200 OK\r\n folded: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
    ],
)
def test_heads_that_could_be_read_two_ways_are_refused(raw: bytes) -> None:
    with pytest.raises(http1.ProtocolError):
        http1.parse_head(raw)


def test_request_head_is_a_get_with_the_headers_given() -> None:
    head = http1.request_head("/b/k%20ey?x=1", {"Host": "h:9000", "x-amz-date": "d"})
    assert head == b"GET /b/k%20ey?x=1 HTTP/1.1\r\nHost: h:9000\r\nx-amz-date: d\r\n\r\n"


def test_request_head_names_its_method() -> None:
    head = http1.request_head("/b/k", {"Host": "h"}, "HEAD")
    assert head == b"HEAD /b/k HTTP/1.1\r\nHost: h\r\n\r\n"


# --- over loopback sockets, against scripted answers ---------------------------------------

# Request number (from 0) -> bytes to send; (bytes, "close"): send, then close; None: close.
Answer = Callable[[int], bytes | tuple[bytes, str] | None]


class Peer:
    """A loopback server answering each request head with scripted bytes; counts
    connections and requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                data = self.answer(len(self.requests) - 1)
                if data is None:
                    break
                writer.write(data if isinstance(data, bytes) else data[0])
                await writer.drain()
                if not isinstance(data, bytes):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def pool(
        self,
        *,
        limit: int = 4,
        read_timeout: float = 5.0,
        on_connect: Callable[[], None] | None = None,
    ) -> http1.Pool:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return http1.Pool(
            "http",
            "127.0.0.1",
            port,
            limit=limit,
            connect_timeout=2.0,
            read_timeout=read_timeout,
            buffer=64 * 1024,
            on_connect=on_connect,
        )


StartPeer = Callable[[Answer], Awaitable[Peer]]


@pytest.fixture
async def peer() -> AsyncIterator[StartPeer]:
    started: list[Peer] = []

    async def start(answer: Answer) -> Peer:
        p = Peer(answer)
        p.server = await asyncio.start_server(p._serve, "127.0.0.1", 0)
        started.append(p)
        return p

    yield start
    for p in started:
        assert p.server is not None
        p.server.close()
        await p.server.wait_closed()


def ok(body: bytes, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def get_body(pool: http1.Pool) -> bytes:
    response = await pool.get("/b/k", {"Host": "h"})
    try:
        return await response.read_all(1 << 20)
    finally:
        response.close()


async def test_connections_are_kept_alive_between_gets(peer: StartPeer) -> None:
    p = await peer(lambda i: ok(f"body {i}".encode()))
    pool = p.pool()
    assert [await get_body(pool) for _ in range(3)] == [b"body 0", b"body 1", b"body 2"]
    assert p.connections == 1
    assert p.requests[0].startswith(b"GET /b/k HTTP/1.1\r\nHost: h\r\n")
    await pool.close()


async def test_a_body_read_in_pieces_gives_the_connection_back_at_its_end(peer: StartPeer) -> None:
    body = bytes(range(256)) * 1000
    p = await peer(lambda i: ok(body))
    pool = p.pool()
    response = await pool.get("/b/k", {"Host": "h"})
    assert response.length == len(body)
    got = b""
    while chunk := await response.read(10_000):
        assert len(chunk) <= 10_000
        got += chunk
    assert got == body
    assert len(pool._idle) == 1  # given back by the read that ended the body
    response.close()
    assert len(pool._idle) == 1  # closing again changes nothing
    await pool.close()


async def test_chunked_bodies_with_extensions_and_trailers(peer: StartPeer) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    p = await peer(lambda i: chunked)
    pool = p.pool()
    assert await get_body(pool) == b"hello 0123456789"
    assert await get_body(pool) == b"hello 0123456789"
    assert p.connections == 1
    await pool.close()


@pytest.mark.parametrize(
    "bad",
    [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n", b"5\r\nhel"],
)
async def test_a_malformed_or_cut_chunked_body_is_a_protocol_error(
    peer: StartPeer, bad: bytes
) -> None:
    p = await peer(
        lambda i: (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + bad, "close")
    )
    pool = p.pool(read_timeout=2.0)
    response = await pool.get("/b/k", {"Host": "h"})
    with pytest.raises(http1.ProtocolError):
        await response.read_all(1 << 20)
    response.close()
    assert not pool._idle and not pool._open
    await pool.close()


async def test_a_body_cut_short_is_an_error_and_its_connection_is_not_reused(
    peer: StartPeer,
) -> None:
    p = await peer(lambda i: (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", "close"))
    pool = p.pool()
    response = await pool.get("/b/k", {"Host": "h"})
    assert await response.read(100) == b"12345"
    with pytest.raises(http1.ProtocolError, match="5 of 10"):
        await response.read(100)
    response.close()
    assert not pool._idle and not pool._open
    await pool.close()


async def test_connection_close_and_unread_bodies_are_not_reused(peer: StartPeer) -> None:
    p = await peer(lambda i: ok(b"x" * 100, "Connection: close") if i == 0 else ok(b"y" * 100))
    pool = p.pool()
    assert await get_body(pool) == b"x" * 100
    assert p.connections == 1 and not pool._idle
    response = await pool.get("/b/k", {"Host": "h"})
    assert await response.read(10) == b"y" * 10
    response.close()  # 90 bytes unread: the connection cannot carry another answer
    assert p.connections == 2 and not pool._idle
    await pool.close()


async def test_a_kept_connection_the_server_closed_while_idle_is_replaced(
    peer: StartPeer,
) -> None:
    p = await peer(lambda i: (ok(b"abc"), "close"))  # one answer per connection, then closed
    pool = p.pool()
    assert await get_body(pool) == b"abc"
    assert await get_body(pool) == b"abc"
    assert p.connections == 2
    await pool.close()


async def test_a_kept_connection_closed_as_a_get_is_sent_is_replaced(peer: StartPeer) -> None:
    # The second GET finds the connection open, and the server closes it on reading it.
    p = await peer(lambda i: None if i == 1 else ok(b"abc"))
    pool = p.pool()
    assert await get_body(pool) == b"abc"
    assert await get_body(pool) == b"abc"
    assert p.connections == 2 and len(p.requests) == 3
    await pool.close()


async def test_a_fresh_connection_closed_before_an_answer_is_an_error(peer: StartPeer) -> None:
    p = await peer(lambda i: None)
    pool = p.pool()
    with pytest.raises(http1.ProtocolError, match="before an answer"):
        await pool.get("/b/k", {"Host": "h"})
    assert p.connections == 1  # not retried: the caller decides
    await pool.close()


async def test_a_stalled_answer_is_a_read_timeout(peer: StartPeer) -> None:
    p = await peer(lambda i: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    pool = p.pool(read_timeout=0.2)
    response = await pool.get("/b/k", {"Host": "h"})
    assert await response.read(100) == b"12345"
    with pytest.raises(http1.ReadTimeout):
        await response.read(100)
    response.close()
    await pool.close()


async def test_gets_past_the_limit_wait_for_a_slot(peer: StartPeer) -> None:
    p = await peer(lambda i: ok(b"z"))
    pool = p.pool(limit=1)
    first = await pool.get("/b/k", {"Host": "h"})
    second = asyncio.ensure_future(pool.get("/b/k", {"Host": "h"}))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not second.done()
    assert await first.read_all(10) == b"z"
    first.close()
    response = await second
    assert await response.read_all(10) == b"z"
    response.close()
    assert p.connections == 1
    await pool.close()


async def test_a_response_dropped_unclosed_gives_its_slot_back(peer: StartPeer) -> None:
    p = await peer(lambda i: ok(b"w" * 10))
    pool = p.pool(limit=1)
    response = await pool.get("/b/k", {"Host": "h"})
    assert await response.read(4) == b"wwww"
    del response  # as when a task is cancelled between the GET and its `finally`
    again = await asyncio.wait_for(pool.get("/b/k", {"Host": "h"}), 5)
    assert await again.read_all(100) == b"w" * 10
    again.close()
    assert p.connections == 2  # the dropped one, half read, was not reused
    await pool.close()


async def test_each_new_connection_is_told_and_a_closed_pool_keeps_none(peer: StartPeer) -> None:
    p = await peer(lambda i: ok(b"q"))
    opened: list[int] = []
    pool = p.pool(on_connect=lambda: opened.append(1))
    for _ in range(3):
        assert await get_body(pool) == b"q"
    assert len(opened) == 1 == p.connections
    response = await pool.get("/b/k", {"Host": "h"})
    await pool.close()  # while a GET is still being read
    assert await response.read_all(10) == b"q"
    response.close()
    assert not pool._idle and not pool._open


async def test_a_head_then_a_get_share_one_connection(peer: StartPeer) -> None:
    """A HEAD's answer carries the object's Content-Length and no body: nothing is waited
    for, and the next request's answer is read from the start of the next bytes."""
    p = await peer(
        lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" if n == 0 else ok(b"hello")
    )
    pool = p.pool()
    try:
        response = await pool.get("/b/k", {"Host": "h"}, "HEAD")
        assert (response.status, response.length) == (200, 0)
        assert response.head.headers["content-length"] == "5"
        assert await response.read(10) == b""
        assert await get_body(pool) == b"hello"
    finally:
        await pool.close()
    assert p.connections == 1
    assert [r.split(b" ", 1)[0] for r in p.requests] == [b"HEAD", b"GET"]
