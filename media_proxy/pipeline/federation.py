"""Federation media (`/_matrix/federation/v1/media/download/{media_id}`): local media
asked for by another homeserver, answered as Synapse's `multipart/mixed` body.

Synapse's order (`BaseFederationServlet._wrap`, `FederationMediaDownloadServlet`,
`get_local_media(federation=True)`): the X-Matrix signature (federation_auth.py) with a key
Synapse already stored, the origin's rate limit, the local row (never `remote_media_cache`;
`authenticated` is not checked), `If-None-Match`, then the file from the store or S3. The
proxy answers itself only the refusals it knows byte for byte (a malformed header, a
destination mismatch, the whitelist) and the successes it can verify; a key it does not
hold or that is about to expire, a signature that fails, an origin that has many requests
in flight, and every row Synapse would refuse, go to Synapse. Thumbnails
(`/_matrix/federation/v1/media/thumbnail/{media_id}`, which Synapse itself never requests)
follow the same story with the thumbnail Synapse would choose.
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from aiohttp import web

from media_proxy import federation_auth as fa
from media_proxy import headers as h
from media_proxy import paths, respond
from media_proxy.fill import Fill
from media_proxy.locate import Hit, Miss
from media_proxy.metadata import DatabaseError, LocalMedia
from media_proxy.parse import Kind, MediaRequest
from media_proxy.passthrough import client_ip
from media_proxy.pipeline.steps import Env, Outcome, PassThrough, choose_thumbnail, safe_values

_CRLF: Final = b"\r\n"
_JSON_PART: Final = b"{}"  # json.dumps({}): Synapse's (empty) JSON part
# Bytes of the framing besides the boundaries, the two part headers and the JSON: see
# `framing`; Synapse's `MultipartFileConsumer.content_length` adds 156 with 32-hex boundaries.
_SUCCESS_CACHE: Final = h.MEDIA_CACHE  # Cache-Control, ETag: 1 (no CORS, CSP or robots)

# Requests one origin has being answered by this worker. Synapse lets `rc_federation`'s
# `concurrent` (default 3) run at once per origin and queues, delays or refuses the rest;
# the proxy does not queue: past the limit a request goes to Synapse, whose limiter then
# applies to it.
_in_flight: collections.Counter[str] = collections.Counter()


def _escape(value: str) -> str:
    """Synapse's part-header escaping (`media_storage.escape`)."""
    return value.replace("\r", "").replace("\n", "").replace('"', '\\"')


def framing(boundary: str, media_type: str, disposition: str) -> tuple[bytes, bytes]:
    """The bytes before and after the file in Synapse's multipart answer."""
    delimiter = b"--" + boundary.encode("ascii")
    head = b"".join(
        (
            _CRLF + delimiter + _CRLF,
            b"Content-Type: application/json" + _CRLF,
            _CRLF + _JSON_PART,
            _CRLF + delimiter + _CRLF,
            f"Content-Type: {_escape(media_type)}".encode("ascii") + _CRLF,
            f"Content-Disposition: {_escape(disposition)}".encode("ascii") + _CRLF + _CRLF,
        )
    )
    return head, _CRLF + delimiter + b"--" + _CRLF


def success_headers(boundary: str, length: int) -> h.Headers:
    return [
        *_SUCCESS_CACHE,
        ("Content-Length", str(length)),
        ("Content-Type", f"multipart/mixed; boundary={boundary}"),
    ]


async def _refuse(
    request: web.Request, outcome: Outcome, refusal: fa.Refusal
) -> web.StreamResponse:
    outcome.source = "proxy"
    return await respond.error(request, refusal.status, refusal.body(), [])


async def _authenticate(env: Env, request: web.Request) -> fa.XMatrix | fa.Refusal:
    """The origin, when its signature verifies with keys Synapse holds; a refusal Synapse
    would send without a key; PassThrough otherwise."""
    config = env.config
    checked = fa.authenticate(
        request.headers.getall("Authorization", []),
        config.server_name,
        config.federation_domain_whitelist,
    )
    if checked is None:
        raise PassThrough
    if isinstance(checked, fa.Refusal):
        return checked
    if checked.origin == config.server_name:
        raise PassThrough  # Synapse checks its own keys from its config, not the database
    now_ms = int(time.time() * 1000)
    keys = {}
    for key_id in checked.key_ids:
        try:
            rows = await env.metadata.server_keys(checked.origin, key_id)
        except DatabaseError:
            raise PassThrough from None
        key = fa.usable_key(rows, key_id, now_ms)
        if key is None:
            raise PassThrough  # Synapse would fetch it (and store it for next time)
        keys[key_id] = key
    if not fa.verify(checked, request.method, request.raw_path, config.server_name, keys):
        raise PassThrough  # Synapse's 401 carries PyNaCl's message: its own to send
    return checked


@contextmanager
def _slot(env: Env, origin: str) -> Iterator[None]:
    if _in_flight[origin] >= env.config.federation_concurrent:
        raise PassThrough
    _in_flight[origin] += 1
    try:
        yield
    finally:
        _in_flight[origin] -= 1
        if not _in_flight[origin]:
            del _in_flight[origin]


async def _row(env: Env, media: MediaRequest) -> LocalMedia:
    """The local row, when Synapse would serve its file: everything else is Synapse's."""
    try:
        row = await env.metadata.local_media(media.media_id)
    except DatabaseError:
        raise PassThrough from None
    if (
        row is None  # 404 with the path (remote media ids included)
        or row.quarantined_by is not None  # the same 404
        or not row.media_length  # pending upload; or empty: Synapse sends no framing then
        or row.url_cache is not None  # URL previews: local-only files
        or not safe_values(row.media_type, row.upload_name)
        or not (row.media_type or "").isascii()  # Synapse fails encoding the part header
    ):
        raise PassThrough
    return row


async def serve(
    env: Env, request: web.Request, media: MediaRequest, outcome: Outcome
) -> web.StreamResponse:
    """Authentication, the origin's slot, the row and the 304, then the file or thumbnail."""
    checked = await _authenticate(env, request)
    if isinstance(checked, fa.Refusal):
        return await _refuse(request, outcome, checked)
    with _slot(env, checked.origin):
        row = await _row(env, media)
        if media.kind is Kind.DOWNLOAD:
            env.metadata.mark_accessed(row.media_id)  # thumbnails: once sent
        if h.is_not_modified(request.headers.getall("If-None-Match", [])):
            outcome.source = "proxy"
            response = await respond.not_modified(request, list(_SUCCESS_CACHE))
        elif media.kind is Kind.DOWNLOAD:
            response = await _download(env, request, row, outcome)
        else:
            response = await _thumbnail(env, request, media, row, outcome)
        if media.kind is Kind.THUMBNAIL:
            env.metadata.mark_accessed(row.media_id)
        return response


async def _download(
    env: Env, request: web.Request, row: LocalMedia, outcome: Outcome
) -> web.StreamResponse:
    assert row.media_length is not None
    try:
        rel = paths.local_media(row.media_id)
    except paths.PathError:
        raise PassThrough from None
    media_type = row.media_type or "application/octet-stream"
    disposition = h.content_disposition(media_type, row.upload_name)
    return await _send(
        env, request, rel, row.media_length, row.sha256, media_type, disposition, outcome
    )


async def _thumbnail(
    env: Env, request: web.Request, media: MediaRequest, row: LocalMedia, outcome: Outcome
) -> web.StreamResponse:
    """The stored thumbnail Synapse would choose (`respond_local_thumbnail` with
    `for_federation`): its type verbatim, a bare inline/attachment disposition."""
    try:
        chosen = choose_thumbnail(await env.metadata.local_thumbnails(row.media_id), media, env)
        rel = paths.local_thumbnail(
            row.media_id, chosen.width, chosen.height, chosen.content_type, chosen.method
        )
    except (paths.PathError, DatabaseError):
        raise PassThrough from None
    if not chosen.length or not chosen.content_type.isascii():
        raise PassThrough
    disposition = h.content_disposition(chosen.content_type, None)
    return await _send(
        env, request, rel, chosen.length, None, chosen.content_type, disposition, outcome
    )


async def _send(
    env: Env,
    request: web.Request,
    rel: str,
    length: int,
    sha256: str | None,
    media_type: str,
    disposition: str,
    outcome: Outcome,
) -> web.StreamResponse:
    """The store file, else a fill from S3, framed; anything else (no file, S3 down, the
    cache full): Synapse, which reads the same store and S3."""
    boundary = uuid.uuid4().hex
    head, tail = framing(boundary, media_type, disposition)
    total = len(head) + length + len(tail)
    try:
        found = await env.locator.locate(
            rel, length, sha256, open_hit=True, client=client_ip(request)
        )
    except respond.Refused:
        raise PassThrough from None
    if found is None:
        raise PassThrough
    source: int | Fill
    try:
        if isinstance(found, Hit):
            outcome.source, source = "cache", found.fd
        elif isinstance(found, Miss):
            outcome.source, source = "s3", found.fill
        else:
            raise PassThrough  # uncached S3 stream: not worth a third sending path
        response = await respond.multipart(
            request, success_headers(boundary, total), (head, tail), source, length
        )
        outcome.bytes = 0 if request.method == "HEAD" else total
        return response
    except respond.ClientGone:
        outcome.bytes = -1
        raise
    finally:
        found.close()
