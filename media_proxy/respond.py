"""Step 4: write the answer, exactly as Synapse would, with the bytes sent zero-copy.

Headers are decided before a byte is sent (headers.py); then the body goes out with
`sendfile` from the store file, or from the growing fill file for a miss. A source that
breaks after the headers went out aborts the connection: a client never gets a clean short
200. aiohttp's FileResponse is not used: it adds ETag, Last-Modified and Range handling
that Synapse does not have.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from media_proxy import headers as h
from media_proxy.fill import Fill, FillFailed
from media_proxy.s3 import S3Object


class ClientGone(Exception):
    """The client hung up; nothing more to send."""


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
    """One direct sendfile on the socket when nothing is queued before it; returns bytes sent.

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
    except OSError as e:
        raise ClientGone from e


async def _sendfile(request: web.Request, fd: int, offset: int, count: int) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ClientGone
    sent = _sendfile_now(transport, fd, offset, count)
    if sent == count:
        return
    # The rest in one call: it waits for writability itself, so clients still interleave,
    # and every extra call would pause, drain and resume the transport again (measured: 4 MiB
    # calls halved the throughput of a 20 MiB hit).
    try:
        await asyncio.get_running_loop().sendfile(
            transport,
            _FdFile(fd),  # type: ignore[arg-type]
            offset + sent,
            count - sent,
        )
    except (ConnectionError, RuntimeError) as e:  # RuntimeError: "Transport is closing"
        raise ClientGone from e


def abort(request: web.Request) -> None:
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
    await response.prepare(request)
    if request.method != "HEAD":
        await response.write(body)
    await response.write_eof()
    return response


async def not_modified(request: web.Request, headers: h.Headers) -> web.StreamResponse:
    response = web.StreamResponse(status=304)
    for name, value in headers:
        response.headers.add(name, value)
    await response.prepare(request)
    await response.write_eof()
    return response


async def _start(request: web.Request, media_headers: h.Headers) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    for name, value in media_headers:
        response.headers.add(name, value)
    await response.prepare(request)
    return response


async def file(
    request: web.Request, media_headers: h.Headers, fd: int, length: int
) -> web.StreamResponse:
    """A complete store file (a cache hit)."""
    response = await _start(request, media_headers)
    if request.method != "HEAD" and length:
        await _sendfile(request, fd, 0, length)
    await response.write_eof()
    return response


def accel_redirect(media_headers: h.Headers, location: str) -> web.Response:
    """A hit handed to nginx: our headers, its sendfile (X-Accel-Redirect mode)."""
    response = web.Response(status=200)
    for name, value in media_headers:
        if name != "Content-Length":
            response.headers.add(name, value)
    response.headers["X-Accel-Redirect"] = location
    return response


async def fill(request: web.Request, media_headers: h.Headers, fill: Fill) -> web.StreamResponse:
    """A miss: bytes are sent as the fill writes them; a broken fill aborts the client."""
    response = await _start(request, media_headers)
    if request.method != "HEAD":
        offset = 0
        while offset < fill.length:
            try:
                end = await fill.wait_beyond(offset)
            except FillFailed:
                abort(request)
                return response
            await _sendfile(request, fill.fd, offset, end - offset)
            offset = end
    await response.write_eof()
    return response


async def stream(
    request: web.Request, media_headers: h.Headers, body: S3Object, chunk_size: int
) -> web.StreamResponse:
    """Uncached: S3's body straight to the client; a short body aborts the client."""
    response = await _start(request, media_headers)
    if request.method != "HEAD":
        sent = 0
        try:
            async for chunk in body.chunks(chunk_size):
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError) as e:
            raise ClientGone from e
        except Exception:
            sent = -1
        if sent != body.length:
            abort(request)
            return response
    await response.write_eof()
    return response
