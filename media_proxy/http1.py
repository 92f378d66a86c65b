"""A small HTTP/1.1 client for S3's signed GETs (and HEADs): one keep-alive pool per endpoint.

Why not aiohttp's client: a GET through `ClientSession` costs about 0.1 ms more CPU than
this one back to back, and 0.3 to 0.4 ms more when GETs come a few milliseconds apart, as
misses do (its timeout handles, connector bookkeeping, response objects), which is a third
of what a small miss spends in the proxy. A signed S3 GET needs little: one request head
built beforehand, an answer framed by Content-Length (or chunked: listings and error
documents may be), and connections kept alive between misses.

What it does not do: redirects, cookies, compression, proxies, request bodies, pipelining.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

# A connection left idle this long is closed rather than reused (aiohttp's default too):
# servers and middleboxes drop idle connections without a word after a while.
KEEPALIVE_S: Final = 15.0
# Longest response head accepted (S3 answers carry a dozen headers).
MAX_HEAD: Final = 64 * 1024
_CRLF: Final = b"\r\n"


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 as this client reads it, or it ended early."""


class ReadTimeout(TimeoutError):
    """The server sent nothing for `read_timeout` seconds."""


@dataclass(frozen=True, slots=True)
class Head:
    """A response head: status, headers (names lower-cased; repeated ones joined by ", "),
    and how the body is framed."""

    status: int
    headers: dict[str, str]
    length: int | None  # Content-Length; None when chunked or ended by closing
    chunked: bool
    keep_alive: bool


def parse_head(data: bytes, *, to_head: bool = False) -> Head:
    """A response head, up to and including its blank line. ProtocolError if malformed,
    and for framing that can be read two ways (RFC 9112 6.3: a Content-Length beside
    chunked, or lengths that disagree), which a client must not guess at. The answer to a
    HEAD (`to_head`) has no body whatever its headers say; its Content-Length is the
    object's (in `headers`)."""
    lines = data.split(_CRLF)
    version, _, rest = lines[0].partition(b" ")
    digits = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(digits) != 3 or not digits.isdigit():
        raise ProtocolError("malformed status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ProtocolError("malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    status = int(digits)
    connection = headers.get("connection", "").lower()
    keep_alive = "close" not in connection if version == b"HTTP/1.1" else "keep-alive" in connection
    encoding = headers.get("transfer-encoding")
    chunked = False
    if encoding is not None:
        if encoding.lower() != "chunked":
            raise ProtocolError(f"Transfer-Encoding {encoding!r} is not read here")
        if "content-length" in headers:
            raise ProtocolError("both Content-Length and Transfer-Encoding")
        chunked = True
    length = None
    if "content-length" in headers:
        values = {v.strip() for v in headers["content-length"].split(",")}
        if len(values) != 1 or not (number := values.pop()).isdigit():
            raise ProtocolError("Content-Length is not one number")
        length = int(number)
    if (to_head and status >= 200) or status in (204, 304) or 100 <= status < 200:
        length, chunked = 0, False
    elif length is None and not chunked:
        keep_alive = False  # the body ends when the server closes
    return Head(status, headers, length, chunked, keep_alive)


def request_head(target: str, headers: Mapping[str, str], method: str = "GET") -> bytes:
    """A request head without a body (GET, HEAD); `headers` must hold Host."""
    lines = [f"{method} {target} HTTP/1.1"]
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        """Still open (a server that closed it while it was idle has left EOF in the reader)
        and not idle too long."""
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.idle_since < KEEPALIVE_S
        )

    def close(self) -> None:
        self.writer.close()


class Response:
    """An answer being read. Read the body with `read` or `read_all`, then `close` (which
    keeps the connection for the next GET when the body was read to its end)."""

    def __init__(self, pool: Pool, conn: _Connection, head: Head) -> None:
        self._pool, self._conn, self.head = pool, conn, head
        self._left = head.length  # body bytes still to read; None: chunked or until close
        self._chunk_left = 0  # chunked: bytes left in the current chunk
        self._done = head.length == 0
        self._released = False

    @property
    def status(self) -> int:
        return self.head.status

    @property
    def length(self) -> int | None:
        """Content-Length; None when chunked or ended by closing."""
        return self.head.length

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes of the body, as they come; b"" at its end. ProtocolError when
        the connection ends first, ReadTimeout when the server stalls."""
        if self._done:
            self.close()
            return b""
        if self.head.chunked:
            return await self._read_chunked(n)
        want = n if self._left is None else min(n, self._left)
        try:
            async with asyncio.timeout(self._pool.read_timeout):
                data = await self._conn.reader.read(want)
        except TimeoutError:
            raise ReadTimeout("the body stalled") from None
        if self._left is None:
            if not data:
                self._done = True
            return data
        if not data:
            raise ProtocolError(
                f"connection closed with {self._left} of {self.length} body bytes unread"
            )
        self._left -= len(data)
        if self._left == 0:
            self._done = True
            self.close()  # the connection goes back to the pool at once
        return data

    async def _read_chunked(self, n: int) -> bytes:
        reader = self._conn.reader
        try:
            async with asyncio.timeout(self._pool.read_timeout):
                if self._chunk_left == 0:
                    line = await reader.readuntil(_CRLF)
                    size_text = line.split(b";", 1)[0].strip()
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        raise ProtocolError("malformed chunk size") from None
                    if size == 0:
                        while await reader.readuntil(_CRLF) != _CRLF:  # trailers
                            pass
                        self._done = True
                        self.close()
                        return b""
                    self._chunk_left = size
                data = await reader.read(min(n, self._chunk_left))
                if not data:
                    raise ProtocolError("connection closed inside a chunk")
                self._chunk_left -= len(data)
                if self._chunk_left == 0 and await reader.readexactly(2) != _CRLF:
                    raise ProtocolError("chunk not followed by CRLF")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise ProtocolError(f"malformed chunked body: {type(e).__name__}") from e
        except TimeoutError:
            raise ReadTimeout("the body stalled") from None
        return data

    async def read_all(self, limit: int) -> bytes:
        """The whole body; ProtocolError past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        while chunk := await self.read(256 * 1024):
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Give the connection back (body read to its end, server keeps it alive) or close
        it; either way the pool's slot is free again. Idempotent."""
        if self._released:
            return
        self._released = True
        self._pool._release(self._conn, reuse=self._done and self.head.keep_alive)

    def __del__(self) -> None:
        # A response dropped unclosed (its task cancelled between the GET and the caller's
        # `finally`) must not hold its pool slot for ever: GETs would queue behind it. The
        # garbage collector may run this in any thread: the release goes through the loop.
        if not self._released:
            self._released = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to free
                self._pool.loop.call_soon_threadsafe(
                    functools.partial(self._pool._release, self._conn, reuse=False)
                )


class Pool:
    """Keep-alive connections to one `scheme://host:port`, at most `limit` at once (GETs
    past it wait for a free slot, as in aiohttp's connector)."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        *,
        limit: int,
        connect_timeout: float,
        read_timeout: float,
        buffer: int,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.on_connect = on_connect  # told of each new connection (a metric)
        self.ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if scheme == "https" else None
        )
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.buffer = buffer  # a connection reads ahead up to twice this, then waits
        self._slots = asyncio.Semaphore(limit)
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open: set[_Connection] = set()
        self._closed = False
        self.loop = asyncio.get_running_loop()

    async def get(self, target: str, headers: Mapping[str, str], method: str = "GET") -> Response:
        """Send a GET (or a HEAD) and read its answer's head. A reused connection that
        turns out closed by the server before answering is replaced once by a new one (the
        request was not answered, so asking again is safe); other failures raise OSError
        (ProtocolError, ReadTimeout, refused or reset connections)."""
        data = request_head(target, headers, method)
        to_head = method == "HEAD"
        await self._slots.acquire()
        try:
            while True:
                conn, reused = self._take(), True
                if conn is None:
                    conn, reused = await self._connect(), False
                try:
                    return Response(self, conn, await self._exchange(conn, data, to_head))
                except _StaleConnection:
                    self._discard(conn)
                    if not reused:
                        raise ProtocolError("connection closed before an answer") from None
                except BaseException:
                    self._discard(conn)
                    raise
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, conn: _Connection, data: bytes, to_head: bool) -> Head:
        conn.writer.write(data)
        reader = conn.reader
        try:
            async with asyncio.timeout(self.read_timeout):
                while True:
                    raw = await reader.readuntil(_CRLF + _CRLF)
                    head = parse_head(raw, to_head=to_head)
                    if not 100 <= head.status < 200:
                        return head  # 1xx: an interim answer, the real one follows
        except asyncio.IncompleteReadError as e:
            if not e.partial:
                raise _StaleConnection from None
            raise ProtocolError("connection closed inside the answer's head") from None
        except asyncio.LimitOverrunError:
            raise ProtocolError("answer head too large") from None
        except (ConnectionResetError, BrokenPipeError):
            raise _StaleConnection from None
        except TimeoutError:
            raise ReadTimeout("no answer in time") from None

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()  # the most recent: the likeliest still open
            if conn.usable(now):
                return conn
            self._discard(conn)
        return None

    async def _connect(self) -> _Connection:
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl else None,
                limit=max(self.buffer, MAX_HEAD),
            )
        conn = _Connection(reader, writer)
        self._open.add(conn)
        if self.on_connect is not None:
            self.on_connect()
        return conn

    def _release(self, conn: _Connection, *, reuse: bool) -> None:
        if reuse and not self._closed and not conn.writer.is_closing():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._discard(conn)
        self._slots.release()

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    async def close(self) -> None:
        """Close every connection, idle or in use (an answer still being read then ends
        with an error, or with what was already received); none is kept afterwards."""
        self._closed = True
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()


class _StaleConnection(Exception):
    """A kept-alive connection the server had closed: nothing was answered on it."""
