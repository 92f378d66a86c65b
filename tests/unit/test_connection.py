"""connection.py: the aiohttp glue that reads heads as Twisted does and answers errors.

A real aiohttp server on loopback made by `connection.Runner`, with a trivial handler (the
component under test is the connection handler, not the proxy's pipeline), and raw bytes
over a socket: a refused head gets Twisted's bare 400 and one `request.refused` event, a
handler failure Synapse's JSON 500 and one `request.failed` event, and a good head passes.
"""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from structlog.testing import capture_logs

from media_proxy import connection


async def _exchange(port: int, head: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    # to EOF: every answer here closes the connection
    data = await asyncio.wait_for(reader.read(), timeout=10)
    writer.close()
    return data


async def _serve(heads: list[bytes]) -> list[bytes]:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/boom":
            raise RuntimeError("handler bug")
        return web.Response(text=f"{request.method} {request.raw_path}")

    app = web.Application()
    app.router.add_route("*", r"/{tail:[\s\S]*}", handle)
    runner = connection.Runner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return [await _exchange(port, head) for head in heads]
    finally:
        await runner.cleanup()


def test_heads_refused_failed_and_passed() -> None:
    end = b"\r\nHost: x\r\nConnection: close\r\n\r\n"
    with capture_logs() as events:
        refused, failed, passed, absolute = asyncio.run(
            _serve(
                [
                    b"GET  /a?access_token=secret HTTP/1.1" + end,
                    b"GET /boom HTTP/1.1" + end,
                    b"GET /a#b HTTP/1.1" + end,
                    b"GET http://x/y HTTP/1.1" + end,
                ]
            )
        )
    head, _, body = refused.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request") and body == b""
    head, _, body = failed.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 500 Internal Server Error")
    assert b"content-type: application/json" in head.lower()
    assert json.loads(body) == {"errcode": "M_UNKNOWN", "error": "Internal server error"}
    assert passed.endswith(b"\r\n\r\nGET /a%23b")
    assert absolute.endswith(b"\r\n\r\nGET /ttp://x/y")
    kinds = [e["event"] for e in events]
    assert kinds == ["request.refused", "request.failed"], events
    assert events[0]["reason"] == "request line is not three fields split by single spaces"
    assert "secret" not in repr(events)
