"""Step 4: write the answer, exactly as Synapse would, with the bytes sent zero-copy.

Headers are decided before a byte is sent (headers.py); then the body goes out with
`sendfile` from the store file (a small one is read and leaves with the headers in one
write), or from the growing fill file for a miss. Once headers are
out (`started`), the only honest answer to any failure is to abort the connection: a
client never gets a clean short 200, nor a second response after the first. Every byte
sent is counted, so a store file that shrinks while it is sent aborts too. aiohttp's
FileResponse is not used: it adds ETag, Last-Modified and Range handling that Synapse does
not have.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from media_proxy import headers as h
from media_proxy.fill import Fill, FillFailed
from media_proxy.ranges import ByteRange, Unsatisfiable
from media_proxy.s3 import S3Object

_STATE: Final = "media_proxy.sending"
# Chunks under this are hashed on the loop: a thread hop costs more than hashing them.
_HASH_INLINE_MAX: Final = 64 * 1024
# Hits (or ranges) up to this size are read and sent with the headers in one write rather
# than a header write and a sendfile: one socket call less, about 5% of a 1 KiB hit's CPU
# (alternating runs, wrk at 32 connections). At 48 KiB the copy costs what it saves.
_INLINE_MAX: Final = 16 * 1024


class Aborted(Exception):
    """The response had started and could not be finished: the connection was aborted.

    `cause` is what broke: client (hung up), store (the file changed under us), fill (S3's
    body was cut short or wrong), s3 (an uncached S3 stream broke) or error (anything else).
    """

    cause = "error"

    def __init__(self, detail: str = "", *, cause: str | None = None) -> None:
        super().__init__(detail)
        if cause is not None:
            self.cause = cause


class ClientGone(Aborted):
    """The client hung up; nothing more to send."""

    cause = "client"


class Refused(Exception):
    """An error the proxy answers itself, before any byte: S3 down, too many fills."""

    def __init__(
        self, status: int, errcode: str, message: str, *, retry_after_ms: int | None = None
    ) -> None:
        super().__init__(f"{status} {errcode}: {message}")
        self.status, self.errcode, self.message = status, errcode, message
        self.retry_after_ms = retry_after_ms

    def body(self) -> bytes:
        extra = {} if self.retry_after_ms is None else {"retry_after_ms": self.retry_after_ms}
        return h.error_body(self.errcode, self.message, **extra)


@dataclass(slots=True)
class Sending:
    """A response whose headers are (being) written, and the body bytes sent so far."""

    response: web.StreamResponse
    sent: int = 0


def started(request: web.BaseRequest) -> Sending | None:
    """The response this request has started, if any: after that point it cannot change."""
    state: Sending | None = request.get(_STATE)
    return state


async def prepare(request: web.BaseRequest, response: web.StreamResponse) -> Sending:
    """Write the status line and headers; from here on a failure can only abort."""
    state = Sending(response)
    request[_STATE] = state
    try:
        await response.prepare(request)
    except (ConnectionError, RuntimeError) as e:  # "Cannot write to closing transport"
        raise ClientGone(str(e)) from e
    return state


async def write(request: web.BaseRequest, data: bytes | memoryview) -> None:
    """Body bytes through aiohttp's writer, counted; a hang-up becomes ClientGone."""
    state = started(request)
    assert state is not None, "prepare() first"
    try:
        await state.response.write(data)
    except (ConnectionError, RuntimeError) as e:
        raise ClientGone(str(e)) from e
    state.sent += len(data)


async def finish(request: web.BaseRequest) -> None:
    state = started(request)
    assert state is not None, "prepare() first"
    try:
        await state.response.write_eof()
    except (ConnectionError, RuntimeError) as e:
        raise ClientGone(str(e)) from e


class _FdFile:
    """A file object over a shared descriptor with its own position, for loop.sendfile.

    Each client keeps its own offset while several share one descriptor of a fill file.
    """

    mode = "rb"

    def __init__(self, fd: int) -> None:
        self._fd, self._pos = fd, 0

    def fileno(self) -> int:
        return self._fd

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos
        return pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        n = os.preadv(self._fd, [buffer], self._pos)
        self._pos += n
        return n


def _sendfile_now(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
    """One direct sendfile on the socket when nothing is queued before it; returns bytes sent
    (0 also at the file's end: the caller counts).

    loop.sendfile always costs an extra loop iteration and two epoll changes, even when the
    socket takes the whole file at once, as it does for most media on a local network.
    """
    sock = transport.get_extra_info("socket")
    if sock is None or transport.get_write_buffer_size():
        return 0
    try:
        return os.sendfile(sock.fileno(), fd, offset, count)
    except (BlockingIOError, InterruptedError):
        return 0
    except ConnectionError as e:
        raise ClientGone(str(e)) from e
    except OSError as e:  # the file's side: EIO and the like
        raise Aborted(f"reading the file failed: {e}", cause="store") from e


async def _sendfile(request: web.BaseRequest, fd: int, offset: int, count: int) -> None:
    """Send `count` bytes of `fd` from `offset`, or raise Aborted: a file that ends early
    (Synapse rewrites store files in place) must never look like a complete body."""
    state = started(request)
    assert state is not None, "prepare() first"
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ClientGone("transport closed")
    sent = _sendfile_now(transport, fd, offset, count)
    state.sent += sent
    if sent == count:
        return
    loop = asyncio.get_running_loop()
    if isinstance(loop, asyncio.BaseEventLoop):
        # The rest in one call: it waits for writability itself, so clients still interleave,
        # and every extra call would pause, drain and resume the transport again (measured:
        # 4 MiB calls halved the throughput of a 20 MiB hit).
        try:
            rest = await loop.sendfile(
                transport,
                _FdFile(fd),  # type: ignore[arg-type]
                offset + sent,
                count - sent,
            )
        except (ConnectionError, RuntimeError) as e:  # RuntimeError: "Transport is closing"
            raise ClientGone(str(e)) from e
        except OSError as e:  # the file's side: EIO and the like
            raise Aborted(f"reading the file failed: {e}", cause="store") from e
    else:  # uvloop has no loop.sendfile
        rest = await _sendfile_waiting(transport, fd, offset + sent, count - sent)
    state.sent += rest
    if sent + rest != count:
        raise Aborted(f"file ended {count - sent - rest} bytes early", cause="store")


# A stalled client is re-checked this often for a transport closed under it (a shutdown, a
# timeout): the socket's duplicate would otherwise keep the connection open.
_CLOSED_CHECK_S: Final = 1.0
# Sent without giving the loop a turn: a fast reader must not starve the other clients.
_TURN_BYTES: Final = 4 * 1024 * 1024


async def _sendfile_waiting(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
    """Zero-copy sendfile where the loop has none (uvloop): send what the socket takes, wait
    for writability, again, until `count` bytes are sent or the file ends; returns the bytes
    sent. The transport owns the socket's descriptor, so the wait is on a duplicate of it."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise ClientGone("no socket")
    loop = asyncio.get_running_loop()
    out = os.dup(sock.fileno())
    sent = turn = 0
    try:
        while sent < count:
            if transport.is_closing():
                raise ClientGone("transport closed")
            n = -1  # nothing sent: the headers are still queued, or the socket is full
            if not transport.get_write_buffer_size():
                try:
                    n = os.sendfile(out, fd, offset + sent, count - sent)
                except (BlockingIOError, InterruptedError):
                    pass
                except ConnectionError as e:
                    raise ClientGone(str(e)) from e
                except OSError as e:  # the file's side: EIO and the like
                    raise Aborted(f"reading the file failed: {e}", cause="store") from e
            if n == 0:
                break  # the file ended: the caller counts
            if n > 0:
                sent += n
                turn += n
                if turn < _TURN_BYTES:
                    continue
            turn = 0
            await _writable(loop, out)
    finally:
        os.close(out)
    return sent


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Until `fd` is writable (or errs: the next send says how), or _CLOSED_CHECK_S passed."""
    waiter = loop.create_future()

    def wake() -> None:
        if not waiter.done():
            waiter.set_result(None)

    loop.add_writer(fd, wake)
    timer = loop.call_later(_CLOSED_CHECK_S, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        loop.remove_writer(fd)


def abort(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


async def error(
    request: web.Request, status: int, body: bytes, servlet: h.Headers
) -> web.StreamResponse:
    """A Matrix error as Synapse sends it: chunked JSON after the servlet's headers."""
    response = web.StreamResponse(status=status)
    for name, value in h.error_headers(servlet):
        response.headers.add(name, value)
    response.enable_chunked_encoding()
    await prepare(request, response)
    if request.method != "HEAD":
        await write(request, body)
    await finish(request)
    return response


async def not_modified(request: web.Request, headers: h.Headers) -> web.StreamResponse:
    response = web.StreamResponse(status=304)
    for name, value in headers:
        response.headers.add(name, value)
    await prepare(request, response)
    await finish(request)
    return response


def _ranged(media_headers: h.Headers, byte_range: ByteRange) -> h.Headers:
    """A 200's headers turned into the 206's: the part's length, and where it sits."""
    headers = [
        (name, str(byte_range.size) if name == "Content-Length" else value)
        for name, value in media_headers
    ]
    headers.append(("Content-Range", byte_range.content_range()))
    return headers


class _HeldHeaders(web.StreamResponse):
    """Headers kept until the body's write, which sends both at once (aiohttp's Response
    does the same; should aiohttp drop the attribute, the headers only go out earlier)."""

    _send_headers_immediately = False


async def _start(
    request: web.Request,
    media_headers: h.Headers,
    byte_range: ByteRange | None = None,
    *,
    hold: bool = False,
) -> web.StreamResponse:
    if byte_range is not None:
        media_headers = _ranged(media_headers, byte_range)
    kind = _HeldHeaders if hold else web.StreamResponse
    response = kind(status=200 if byte_range is None else 206)
    for name, value in media_headers:
        response.headers.add(name, value)
    await prepare(request, response)
    return response


async def file(
    request: web.Request,
    media_headers: h.Headers,
    fd: int,
    length: int,
    byte_range: ByteRange | None = None,
) -> web.StreamResponse:
    """A complete store file (a cache hit), or one range of it (206)."""
    start, count = (0, length) if byte_range is None else (byte_range.start, byte_range.size)
    if 0 < count <= _INLINE_MAX and request.method != "HEAD":
        return await _small_file(request, media_headers, fd, start, count, byte_range)
    response = await _start(request, media_headers, byte_range)
    if request.method != "HEAD" and count:
        await _sendfile(request, fd, start, count)
    await finish(request)
    return response


async def _small_file(
    request: web.Request,
    media_headers: h.Headers,
    fd: int,
    start: int,
    count: int,
    byte_range: ByteRange | None,
) -> web.StreamResponse:
    """A small body read whole (from the page cache, as sendfile would) before the headers:
    a failed or short read aborts with nothing sent."""
    try:
        data = os.pread(fd, count, start)
    except OSError as e:
        raise Aborted(f"reading the file failed: {e}", cause="store") from e
    if len(data) != count:
        raise Aborted(f"file ended {count - len(data)} bytes early", cause="store")
    response = await _start(request, media_headers, byte_range, hold=True)
    await write(request, data)
    await finish(request)
    return response


async def unsatisfiable(
    request: web.Request, servlet: h.Headers, unsatisfiable: Unsatisfiable
) -> web.StreamResponse:
    """416: no byte of the file is in the range asked."""
    headers = [*servlet, ("Content-Range", unsatisfiable.content_range())]
    body = h.error_body("M_UNKNOWN", "Requested range not satisfiable")
    return await error(request, 416, body, headers)


def accel_redirect(media_headers: h.Headers, location: str) -> web.Response:
    """A hit handed to nginx: our headers, its sendfile (X-Accel-Redirect mode)."""
    response = web.Response(status=200)
    for name, value in media_headers:
        if name != "Content-Length":
            response.headers.add(name, value)
    response.headers["X-Accel-Redirect"] = location
    return response


async def fill(
    request: web.Request,
    media_headers: h.Headers,
    fill: Fill,
    byte_range: ByteRange | None = None,
) -> web.StreamResponse:
    """A miss: bytes are sent as the fill writes them; a broken fill aborts the client.
    A range is sent once the growing file covers it, while the whole file goes on filling
    (the next request for it is a hit)."""
    response = await _start(request, media_headers, byte_range)
    if request.method != "HEAD":
        offset, stop = (
            (0, fill.length) if byte_range is None else (byte_range.start, byte_range.end + 1)
        )
        while offset < stop:
            try:
                end = min(await fill.wait_beyond(offset), stop)
            except FillFailed as e:
                raise Aborted(str(e), cause="fill") from e
            await _sendfile(request, fill.fd, offset, end - offset)
            offset = end
    await finish(request)
    return response


async def multipart(
    request: web.Request,
    headers: h.Headers,
    framing: tuple[bytes, bytes],
    source: int | Fill,
    length: int,
) -> web.StreamResponse:
    """A federation answer: the framing's head (JSON part, file part headers), the file
    from the store descriptor or the growing fill, then the closing delimiter. `headers`
    carry the exact Content-Length; a file that ends early aborts, as for downloads."""
    response = await _start(request, headers)
    if request.method != "HEAD":
        head, tail = framing
        await write(request, head)
        if isinstance(source, Fill):
            offset = 0
            while offset < length:
                try:
                    end = min(await source.wait_beyond(offset), length)
                except FillFailed as e:
                    raise Aborted(str(e), cause="fill") from e
                await _sendfile(request, source.fd, offset, end - offset)
                offset = end
        elif length:
            await _sendfile(request, source, 0, length)
        await write(request, tail)
    await finish(request)
    return response


async def stream(
    request: web.Request, media_headers: h.Headers, body: S3Object, chunk_size: int
) -> web.StreamResponse:
    """Uncached: S3's body straight to the client, held to the fill's rules: the last byte
    goes out only once length and sha256 (when the database has one) are verified."""
    response = await _start(request, media_headers)
    if request.method != "HEAD" and body.length:
        hasher = hashlib.sha256() if body.sha256 else None
        held = b""
        received = 0
        try:
            async for chunk in body.chunks(chunk_size):
                received += len(chunk)
                if received > body.length:
                    raise Aborted("S3 sent more bytes than it announced", cause="s3")
                if hasher is not None:
                    if len(chunk) <= _HASH_INLINE_MAX:
                        hasher.update(chunk)
                    else:
                        await asyncio.to_thread(hasher.update, chunk)
                if held:
                    await write(request, held)
                if len(chunk) > 1:
                    await write(request, memoryview(chunk)[:-1])
                held = chunk[-1:]
        except Aborted:
            raise
        except Exception as e:  # S3's stream broke: botocore, aiohttp and socket errors
            raise Aborted(f"S3 body broke: {e!r}", cause="s3") from e
        if received != body.length:
            raise Aborted(f"S3 body ended after {received} of {body.length} bytes", cause="s3")
        if hasher is not None and body.sha256 and hasher.hexdigest() != body.sha256.lower():
            raise Aborted("sha256 of the S3 object differs from the database's", cause="s3")
        await write(request, held)
    await finish(request)
    return response
