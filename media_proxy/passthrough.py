"""Everything the proxy does not answer itself goes to Synapse, streamed both ways.

One long-lived client session (keep-alive pool) per process. Bodies are never held whole:
uploads stream from the client to Synapse and responses stream back. Synapse's status and
headers come back unchanged, minus hop-by-hop headers.
"""

from __future__ import annotations

import json
from typing import Final

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from media_proxy.authorize import Credentials, Denied, SynapseUnavailable
from media_proxy.headers import error_body, error_headers

log = structlog.get_logger(__name__)

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",  # aiohttp already answered 100-continue to the client
    }
)
_CHUNK: Final = 256 * 1024


def end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers without the hop-by-hop ones, including those the Connection header names."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
    }
    return CIMultiDict(
        (k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP and k.lower() not in named
    )


def client_ip(request: web.BaseRequest) -> str | None:
    """The client's address as Synapse should see it: the first hop nginx recorded, if any."""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded:
        return forwarded.split(",")[0].strip()
    return request.remote


class SynapseClient:
    def __init__(self, base_url: str, *, connect_timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def close(self) -> None:
        await self._session.close()

    async def forward(self, request: web.Request) -> web.StreamResponse:
        """Pass one request to Synapse and stream its answer back."""
        headers = end_to_end(request.headers)
        forwarded = request.headers.get("X-Forwarded-For")
        peer = request.remote or ""
        headers["X-Forwarded-For"] = f"{forwarded}, {peer}" if forwarded else peer
        headers.setdefault("X-Forwarded-Proto", request.scheme)
        has_body = request.body_exists
        url = URL(self.base_url + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=request.content if has_body else None,
                allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError) as e:
            log.warning("synapse.unreachable", error=str(e) or type(e).__name__)
            return bad_gateway()
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(end_to_end(upstream.headers))
            await response.prepare(request)
            if request.method != "HEAD":
                try:
                    async for chunk in upstream.content.iter_chunked(_CHUNK):
                        await response.write(chunk)
                except (aiohttp.ClientError, OSError):
                    # Synapse broke off mid-body: the client must see a broken response too.
                    if request.transport is not None:
                        request.transport.abort()
                    return response
            await response.write_eof()
            return response

    async def whoami(self, creds: Credentials, client_ip: str | None) -> Denied | None:
        # Present the token the way the client did: Synapse's answer must be the same one.
        headers = {"Authorization": f"Bearer {creds.token}"} if creds.from_header else {}
        query = list(creds.identity)
        if not creds.from_header:
            query.append(("access_token", creds.token))
        if client_ip:
            headers["X-Forwarded-For"] = client_ip
        url = URL(self.base_url + "/_matrix/client/v3/account/whoami").with_query(query)
        try:
            async with self._session.get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                body = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise SynapseUnavailable(str(e)) from e
        if resp.status == 200:
            return None
        if resp.status in (401, 403):
            try:
                json.loads(body)
            except ValueError as e:
                raise SynapseUnavailable(f"whoami answered {resp.status} without JSON") from e
            return Denied(resp.status, body)
        raise SynapseUnavailable(f"whoami answered {resp.status}")


def bad_gateway() -> web.Response:
    response = web.Response(
        status=502, body=error_body("M_UNKNOWN", "Synapse is unreachable: try again later")
    )
    for name, value in error_headers([]):
        response.headers[name] = value
    return response
