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

from media_proxy import respond
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


def from_synapse(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Synapse's response headers as passed on: end to end, and no `X-Accel-*`.

    nginx acts on X-Accel-* headers from its upstream (X-Accel-Redirect serves any file in
    an internal location; Limit-Rate, Buffering, Expires and Charset change how it sends).
    On the media routes that upstream is media-proxy, and only media-proxy may give nginx
    such instructions: Synapse never sends them, so any that come from it are dropped.
    """
    return CIMultiDict(
        (k, v) for k, v in end_to_end(headers).items() if not k.lower().startswith("x-accel-")
    )


def client_ip(request: web.BaseRequest) -> str | None:
    """The client's address as Synapse should see it: the first hop nginx recorded, if any."""
    forwarded = request.headers.get("X-Forwarded-For")
    if forwarded:
        return forwarded.split(",")[0].strip()
    return request.remote


class SynapseClient:
    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        max_connections: int = 256,
    ) -> None:
        """`connect_timeout` also bounds the wait for a free pooled connection, so a hung
        Synapse that holds all `max_connections` makes new requests fail fast (504) instead
        of piling up; `read_timeout` bounds each wait for Synapse's next bytes."""
        self.base_url = base_url.rstrip("/")
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=connect_timeout, sock_read=read_timeout
            ),
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
        except TimeoutError as e:
            log.warning("synapse.timeout", error=str(e) or type(e).__name__)
            return synapse_error(504, "Synapse did not answer in time: try again later")
        except (aiohttp.ClientError, OSError) as e:
            if _client_gone(request):
                raise respond.ClientGone("client hung up during its upload") from e
            log.warning("synapse.unreachable", error=str(e) or type(e).__name__)
            return bad_gateway()
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(from_synapse(upstream.headers))
            await respond.prepare(request, response)
            if request.method != "HEAD":
                try:
                    async for chunk in upstream.content.iter_chunked(_CHUNK):
                        await respond.write(request, chunk)
                except (aiohttp.ClientError, OSError, TimeoutError) as e:
                    # Synapse broke off (or stalled) mid-body: the client must see a broken
                    # response too.
                    detail = str(e) or type(e).__name__
                    raise respond.Aborted(detail, cause="synapse") from e
            await respond.finish(request)
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

    async def health(self) -> None:
        """Raise unless Synapse's /health answers 200 (the proxy's readiness)."""
        url = URL(self.base_url + "/health")
        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                raise SynapseUnavailable(f"/health answered {resp.status}")


def _client_gone(request: web.BaseRequest) -> bool:
    return request.transport is None or request.transport.is_closing()


def synapse_error(status: int, message: str) -> web.Response:
    response = web.Response(status=status, body=error_body("M_UNKNOWN", message))
    for name, value in error_headers([]):
        response.headers[name] = value
    return response


def bad_gateway() -> web.Response:
    return synapse_error(502, "Synapse is unreachable: try again later")
