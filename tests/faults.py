"""A fault-injecting TCP proxy to put in front of a real server (here: SeaweedFS's S3 port).

It forwards bytes unchanged (so SigV4 signatures stay valid) and, on the way, reads the HTTP
requests going client -> server to record them and to decide what to do with each response:

    proxy = FaultProxy("127.0.0.1", seaweed.s3_port).start()   # own thread, own event loop
    client = s3_client(proxy.url, ...)                          # talk through it
    proxy.requests           # [(method, target), ...] in arrival order; target keeps ?query
    proxy.count("GET", "/media/local_content/")                 # method and path prefix
    proxy.set_latency(0.3)                                      # before each response
    proxy.cut_after(1024, match=lambda method, target: method == "GET")
    proxy.set_down(True)     # refuse new connections (ECONNREFUSED), close the open ones
    proxy.clear_faults(); proxy.reset(); proxy.stop()

How requests are found: request heads are parsed as they pass, bodies are skipped by
Content-Length or chunked framing, so uploads do not confuse it and a keep-alive connection
carries any number of requests. Responses are not parsed: everything the server sends after a
request was forwarded is taken as that request's response, which holds for HTTP/1.1 clients
that do not pipeline (botocore, aiobotocore, aiohttp, http.client). A ``100 Continue`` interim
answer counts as the start of its response.

Faults, switchable at any time from any thread (they apply to requests arriving afterwards):
- latency: sleep before forwarding the first bytes of each matching response;
- cut: forward only the first N bytes of a matching response (status line and headers
  included), then close both sides, so the client sees an incomplete body;
- down: stop listening, so new connections are refused, and close the open ones;
- hang: hold every byte the server sends, on every connection, until ``clear_faults()``
  (any protocol: a database that stops answering);
- stall: forward the first N bytes of a matching response, then hold the rest until
  ``clear_faults()`` (a server that hangs mid-body); ``wait_stalled(k)`` returns once k
  responses are held, a point a test can key to instead of a sleep.
All public methods are thread-safe and work from synchronous or async tests alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, Self

Match = Callable[[str, str], bool]

_MAX_HEAD = 64 * 1024
_READ_SIZE = 256 * 1024


class Request(NamedTuple):
    """One request seen going to the server: method and request target (path?query)."""

    method: str
    path: str


@dataclass
class _Cut:
    after: int
    match: Match | None
    times: int | None


def _matches(match: Match | None, req: Request) -> bool:
    return match is None or match(req.method, req.path)


class _RequestParser:
    """Incremental HTTP/1.x request framing: yields each request head, skips bodies."""

    def __init__(self) -> None:
        self._buf = b""
        self._body_left = 0  # bytes of a Content-Length body (or of a chunk) still to skip
        self._state = "head"  # head | body | chunk_size | chunk_data | trailer | blind
        self._chunk_crlf = False

    def feed(self, data: bytes) -> list[Request]:
        found: list[Request] = []
        self._buf += data
        while self._buf and self._state != "blind":
            if self._state in ("body", "chunk_data"):
                take = min(self._body_left, len(self._buf))
                self._buf = self._buf[take:]
                self._body_left -= take
                if self._body_left:
                    break
                self._state = "chunk_size" if self._state == "chunk_data" else "head"
                continue
            end = self._buf.find(b"\r\n\r\n" if self._state == "head" else b"\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD:
                    self._state = "blind"  # not HTTP as we know it: forward without looking
                break
            if self._state == "head":
                head, self._buf = self._buf[:end], self._buf[end + 4 :]
                found.append(self._head(head))
            elif self._state == "chunk_size":
                line, self._buf = self._buf[:end], self._buf[end + 2 :]
                if not line and self._chunk_crlf:  # the CRLF closing the previous chunk
                    self._chunk_crlf = False
                    continue
                size = int(line.split(b";")[0].strip() or b"0", 16)
                self._chunk_crlf = True
                if size:
                    self._state, self._body_left = "chunk_data", size
                else:
                    self._state = "trailer"
            else:  # trailer lines until an empty one
                line, self._buf = self._buf[:end], self._buf[end + 2 :]
                if not line:
                    self._state, self._chunk_crlf = "head", False
        return found

    def _head(self, head: bytes) -> Request:
        lines = head.decode("latin-1").split("\r\n")
        while lines and not lines[0]:  # stray CRLF between requests
            lines.pop(0)
        parts = (lines[0] if lines else "").split(" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("?", "?")
        length, chunked = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip() or 0)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if chunked:
            self._state = "chunk_size"
        elif length:
            self._state, self._body_left = "body", length
        return Request(method, target)


class _Conn:
    """The response-side state of one proxied connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.latency = 0.0  # to apply before the next response bytes
        self.cut_left: int | None = None  # bytes of the current response still allowed
        self.stall_left: int | None = None  # bytes of the current response before a stall

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.transport.abort()


class FaultProxy:
    """See the module docstring. ``url``/``host``/``port`` are where clients connect."""

    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._requests: list[Request] = []
        self._connections = 0
        self._latency = 0.0
        self._latency_match: Match | None = None
        self._cuts: list[_Cut] = []
        self._stalls: list[_Cut] = []
        self._stalled = 0
        self._stall_changed = threading.Condition(self._lock)
        self._release: asyncio.Event | None = None
        self._hanging = False
        self._down = False
        self._conns: set[_Conn] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Start listening in a background thread; returns once the port is bound."""
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopped = asyncio.Event()
            self._release = asyncio.Event()
            try:
                await self._listen()
            except BaseException as err:
                failure.append(err)
                ready.set()
                return
            ready.set()
            await self._stopped.wait()
            await self._close_all()

        self._thread = threading.Thread(
            target=asyncio.run, args=(main(),), name=f"FaultProxy:{self.upstream_port}"
        )
        self._thread.daemon = True
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        """Close the listener and every connection, and end the thread."""
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close_all(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for conn in list(self._conns):
            conn.abort()

    def _call(self, coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a coroutine function on the proxy's loop and wait for it."""
        assert self._loop is not None, "start() first"
        asyncio.run_coroutine_threadsafe(coro_fn(), self._loop).result(10)

    # --- records --------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """A copy of the requests seen since the last reset, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> int:
        """How many client connections were accepted since the last reset."""
        with self._lock:
            return self._connections

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """How many requests had this method (any if None) and a target with this prefix."""
        return sum(
            1
            for r in self.requests
            if (method is None or r.method == method) and r.path.startswith(path_prefix)
        )

    def reset(self) -> None:
        """Forget recorded requests and the connection count (faults stay as they are)."""
        with self._lock:
            self._requests.clear()
            self._connections = 0
            self._stalled = 0

    # --- faults ---------------------------------------------------------------------------

    def set_latency(self, seconds: float, *, match: Match | None = None) -> None:
        """Delay the start of every response (or of those whose request ``match``es)."""
        with self._lock:
            self._latency, self._latency_match = seconds, match

    def cut_after(
        self, nbytes: int, *, match: Match | None = None, times: int | None = None
    ) -> None:
        """Cut matching responses after ``nbytes`` bytes; ``times`` limits how many (None: all)."""
        with self._lock:
            self._cuts.append(_Cut(nbytes, match, times))

    def hang(self) -> None:
        """Hold every byte the server sends, on every connection, until ``clear_faults()``."""
        with self._lock:
            self._hanging = True

    def stall_after(
        self, nbytes: int, *, match: Match | None = None, times: int | None = None
    ) -> None:
        """Hold matching responses after ``nbytes`` bytes until ``clear_faults()``."""
        with self._lock:
            self._stalls.append(_Cut(nbytes, match, times))

    def wait_stalled(self, count: int = 1, timeout: float = 30.0) -> None:
        """Return once ``count`` responses have been held by a stall (since the last reset)."""
        with self._stall_changed:
            if not self._stall_changed.wait_for(lambda: self._stalled >= count, timeout):
                raise TimeoutError(f"{self._stalled} of {count} responses stalled")

    def set_down(self, down: bool = True) -> None:
        """Down: refuse new connections and close open ones. Up: listen again, same port."""
        with self._lock:
            if down == self._down:
                return
            self._down = down
        self._call(self._close_all if down else self._listen)

    @property
    def down(self) -> bool:
        with self._lock:
            return self._down

    def clear_faults(self) -> None:
        """Remove latency and cuts, and come back up if down."""
        with self._lock:
            self._latency, self._latency_match = 0.0, None
            self._cuts.clear()
            self._stalls.clear()
            self._hanging = False
        if self._loop is not None:
            self._call(self._release_stalls)
        self.set_down(False)

    async def _release_stalls(self) -> None:
        assert self._release is not None
        self._release.set()
        self._release = asyncio.Event()

    def _arm(self, conn: _Conn, req: Request) -> None:
        """Record a request and set up the faults for its response."""
        with self._lock:
            self._requests.append(req)
            conn.latency = self._latency if _matches(self._latency_match, req) else 0.0
            conn.cut_left = None
            for cut in self._cuts:
                if (cut.times is None or cut.times > 0) and _matches(cut.match, req):
                    if cut.times is not None:
                        cut.times -= 1
                    conn.cut_left = cut.after
                    break
            conn.stall_left = None
            for stall in self._stalls:
                if (stall.times is None or stall.times > 0) and _matches(stall.match, req):
                    if stall.times is not None:
                        stall.times -= 1
                    conn.stall_left = stall.after
                    break

    # --- forwarding -----------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer)
        with self._lock:
            self._connections += 1
        self._conns.add(conn)
        try:
            try:
                up_reader, conn.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                return
            upward = asyncio.create_task(self._client_to_server(reader, conn))
            try:
                with contextlib.suppress(OSError):
                    await self._server_to_client(up_reader, conn)
            finally:
                upward.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await upward
        finally:
            self._conns.discard(conn)
            for w in (conn.upstream, writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(OSError):
                        await w.wait_closed()

    async def _client_to_server(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        parser = _RequestParser()
        assert conn.upstream is not None
        try:
            while data := await reader.read(_READ_SIZE):
                for req in parser.feed(data):
                    self._arm(conn, req)  # before the bytes go out: the answer cannot overtake
                conn.upstream.write(data)
                await conn.upstream.drain()
            if conn.upstream.can_write_eof():
                conn.upstream.write_eof()
        except OSError:
            conn.abort()  # a broken client: drop the server side too

    async def _server_to_client(self, reader: asyncio.StreamReader, conn: _Conn) -> None:
        while data := await reader.read(_READ_SIZE):
            while self._hanging:
                assert self._release is not None
                await self._release.wait()
            if conn.latency:
                delay, conn.latency = conn.latency, 0.0
                await asyncio.sleep(delay)
            if conn.cut_left is not None:
                if len(data) >= conn.cut_left:
                    conn.client.write(data[: conn.cut_left])
                    with contextlib.suppress(OSError):
                        await conn.client.drain()
                    return  # the caller closes both sides
                conn.cut_left -= len(data)
            if conn.stall_left is not None:
                if len(data) >= conn.stall_left:
                    head, data = data[: conn.stall_left], data[conn.stall_left :]
                    conn.client.write(head)
                    await conn.client.drain()
                    conn.stall_left = None
                    assert self._release is not None
                    release = self._release
                    with self._stall_changed:
                        self._stalled += 1
                        self._stall_changed.notify_all()
                    await release.wait()
                else:
                    conn.stall_left -= len(data)
            conn.client.write(data)
            await conn.client.drain()
