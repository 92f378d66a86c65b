"""How a connection reads request heads: as Synapse's HTTP server (Twisted) does.

aiohttp's C parser accepts heads Twisted refuses (two spaces in the request line, HTTP/2.0,
a head over 16 KiB), cuts `#...` off the target, and answers what it refuses itself with a
text/plain 400 and a traceback in the log. Here every head goes through `parse.read_head`
(Twisted's rules, as a pure function) before aiohttp's pure-Python parser builds the message,
and a refused head gets Twisted's answer, a bare 400 closing the connection, with one JSON
event (`request.refused`). Handler failures aiohttp would answer with a text/plain 500 get
Synapse's JSON 500 instead.

`Runner` is `web.AppRunner` making its connections with `Connection`, and, given one
handler for every path, sending requests straight to it (see `Runner`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Final

import structlog
from aiohttp import web
from aiohttp.helpers import DEFAULT_CHUNK_SIZE
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError
from aiohttp.http_parser import HttpRequestParserPy, RawRequestMessage
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from media_proxy import parse
from media_proxy.headers import error_body, error_headers

log = structlog.get_logger("media_proxy")

# aiohttp counts lines, Twisted counts headers: room for Twisted's limits to decide, while
# aiohttp's line limits still bound what is buffered before a head is complete.
_MAX_LINES: Final = parse.MAX_HEADERS + 2


class Refused(BadHttpMessage):
    """A head Twisted refuses; the message is `parse.BadRequest`'s rule."""


class TwistedHeadParser(HttpRequestParserPy):
    """aiohttp's pure-Python request parser, given each head as `parse.read_head` reads it."""

    def parse_message(self, lines: list[bytes]) -> RawRequestMessage:
        try:
            head = parse.read_head(lines)
        except parse.BadRequest as e:
            raise Refused(str(e)) from None
        return super().parse_message(head)


class Connection(RequestHandler):
    """aiohttp's connection handler with `TwistedHeadParser` and JSON errors."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        read_bufsize: int = DEFAULT_CHUNK_SIZE,
        auto_decompress: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            manager,
            loop=loop,
            read_bufsize=read_bufsize,
            auto_decompress=auto_decompress,
            **kwargs,
        )
        self._parser = TwistedHeadParser(
            self,
            loop,
            read_bufsize,
            max_line_size=parse.MAX_LINE,
            max_field_size=parse.MAX_LINE,
            max_headers=_MAX_LINES,
            payload_exception=RequestPayloadError,
            auto_decompress=auto_decompress,
            max_msg_queue_size=self._max_msg_queue_size,
        )

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError):
            # aiohttp's own messages quote the bytes (an access token, maybe): name the rule.
            reason = exc.message if isinstance(exc, Refused) else type(exc).__name__
            log.warning("request.refused", reason=reason, peer=request.remote)
            response = web.Response(status=400)
        elif status == 500:
            log.error("request.failed", peer=request.remote, exc_info=exc)
            response = web.Response(
                status=500, body=error_body("M_UNKNOWN", "Internal server error")
            )
            for name, value in error_headers([]):
                response.headers[name] = value
        else:
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already started")
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return Connection(self, loop=self._loop, **self._kwargs)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def expect_continue(request: web.BaseRequest) -> None:
    """Twisted's rule for `Expect`: an HTTP/1.1 request whose first Expect value is
    `100-continue` gets the interim `100 Continue` at once; any other expectation is ignored
    (aiohttp's router answers it with a 417, which Synapse never does)."""
    expect = request.headers.get("Expect")
    if (
        expect is not None
        and expect.isascii()
        and expect.lower() == "100-continue"
        and request.version == HttpVersion11
    ):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the response proper has not started


class Runner(web.AppRunner):
    """`web.AppRunner` whose connections are `Connection`s.

    With `handler`, every request goes straight to it (after `expect_continue`), as the
    app's one catch-all route would send it: aiohttp's router matched a regex against the
    path and unquoted all of it on every request, 6% of a small hit's CPU. The app still
    makes the requests and runs its startup and cleanup hooks.
    """

    def __init__(self, app: web.Application, *, handler: Handler | None = None, **kw: Any) -> None:
        super().__init__(app, **kw)
        self._direct = handler

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        direct = self._direct
        handle = server.request_handler
        if direct is not None:

            async def handle(request: web.BaseRequest) -> web.StreamResponse:
                assert isinstance(request, web.Request)  # made by the app's factory
                await expect_continue(request)
                return await direct(request)

        return _Server(
            handle,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )
