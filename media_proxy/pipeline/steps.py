"""The steps every media pipeline is made of: authorize, check the row, locate, respond.

A step that cannot be sure of Synapse's exact answer raises `PassThrough`, and the request
goes to Synapse unchanged; a step that knows Synapse's answer returns it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import cachetools
from aiohttp import web

from media_proxy import headers as h
from media_proxy import paths, ranges, respond, thumbnail
from media_proxy.authorize import Authorizer, Credentials, SynapseUnavailable, credentials
from media_proxy.config import Config
from media_proxy.locate import Direct, Found, Hit, Locator, Miss
from media_proxy.metadata import Metadata, ThumbnailRow
from media_proxy.parse import Api, MediaRequest
from media_proxy.passthrough import client_ip
from media_proxy.pipeline.rules import Refusal
from media_proxy.ranges import ByteRange, Unsatisfiable
from media_proxy.s3 import S3Error


class PassThrough(Exception):
    """The proxy cannot be sure of Synapse's answer: Synapse answers instead."""


class Undecided(Exception):
    """A decision request (nginx's fast-hit mode) that is not a plain hit: the proxy says
    nothing (204) and nginx sends the client's request to the proxy as usual."""


# Set by the server on a request carrying DECIDE_HEADER in X-Accel mode: nginx asks whether
# it may send the file itself, and caches a yes for a few seconds (nginx/README.md).
DECIDE: Final = "media_proxy.decide"
DECIDE_HEADER: Final = "X-Media-Proxy-Decide"


def deciding(request: web.Request) -> bool:
    return bool(request.get(DECIDE))


@dataclass(slots=True)
class Outcome:
    """What the request log line reports about a request."""

    # cache | cache-accel | s3 | s3-uncached | proxy (answered without bytes) | synapse
    source: str = "synapse"
    bytes: int = 0


# Store paths known to be in S3: the provider never deletes, so a yes stays true for as long
# as a database row names the path (and every request reads the row first).
_IN_S3_CACHE_SIZE: Final = 10_000
_IN_S3_TTL_S: Final = 300.0


@dataclass(frozen=True, slots=True)
class Env:
    """The long-lived parts the steps use."""

    config: Config
    authorizer: Authorizer
    metadata: Metadata
    locator: Locator
    in_s3: cachetools.TTLCache[str, bool] = field(
        default_factory=lambda: cachetools.TTLCache(maxsize=_IN_S3_CACHE_SIZE, ttl=_IN_S3_TTL_S)
    )


@dataclass(frozen=True, slots=True)
class Source:
    """A file to send: its store path (also its S3 key), length, hash and 200 headers."""

    rel: str
    length: int
    sha256: str | None
    headers: h.Headers
    rangeable: bool = False  # downloads answer Range (config `ranges`); thumbnails do not


def safe_values(*values: str | None) -> bool:
    """Database values that become header values must not carry a line break or NUL."""
    return all(h.is_safe_header_value(v or "") for v in values)


async def authorize(
    env: Env, request: web.Request, media: MediaRequest, outcome: Outcome
) -> web.StreamResponse | None:
    """Client API: Synapse's token rules, then whoami. A refusal is the answer; None: go on."""
    if media.api is not Api.CLIENT:
        return None
    authorization = request.headers.getall("Authorization", [])
    if not all(value.isascii() for value in authorization):
        raise PassThrough  # Synapse fails on these with its own 500: its answer to give
    creds = credentials(authorization, media.query)
    if isinstance(creds, Credentials):
        try:
            denied = await env.authorizer.check(creds, client_ip(request))
        except SynapseUnavailable:
            raise PassThrough from None
    else:
        denied = creds
    if denied is None:
        return None
    if deciding(request):
        raise Undecided
    outcome.source = "proxy"
    return await respond.error(request, denied.status, denied.body, [])


async def refuse(
    request: web.Request, outcome: Outcome, refusal: Refusal, servlet: h.Headers
) -> web.StreamResponse:
    if deciding(request):
        raise Undecided
    outcome.source = "proxy"
    return await respond.error(request, refusal.status, refusal.body(), servlet)


async def not_modified(
    request: web.Request, outcome: Outcome, *, download: bool
) -> web.StreamResponse | None:
    """Synapse's 304 for `If-None-Match: 1`; None when the request has no such header."""
    if not h.is_not_modified(request.headers.getall("If-None-Match", [])):
        return None
    if deciding(request):
        raise Undecided
    outcome.source = "proxy"
    return await respond.not_modified(request, h.not_modified_headers(download=download))


def choose_thumbnail(rows: Sequence[ThumbnailRow], media: MediaRequest, env: Env) -> ThumbnailRow:
    """The stored thumbnail Synapse would send; anything it might generate is Synapse's."""
    assert media.thumbnail is not None
    chosen = thumbnail.choose(rows, media.thumbnail, dynamic=env.config.dynamic_thumbnails)
    if chosen is None or chosen.length is None or not safe_values(chosen.content_type):
        raise PassThrough
    return chosen


def thumbnail_headers(row: ThumbnailRow) -> h.Headers:
    assert row.length is not None
    return h.download_headers(row.content_type, row.length, None, download=False)


async def exists(env: Env, rel: str) -> bool:
    """Whether Synapse's `fetch_media` would find a file: any store file, or an S3 object.

    Remote media are looked up this way before Synapse answers a 304 or picks a thumbnail;
    a file it would not find makes it download the media again, an answer not ours to guess.
    """
    if _in_store(env.locator.cache_root, rel):
        return True
    if env.in_s3.get(rel):
        return True
    filler = env.locator.filler
    if filler is None:
        return False
    try:
        found = await filler.s3.size(rel) is not None
    except S3Error:
        raise PassThrough from None
    if found:
        env.in_s3[rel] = True
    return found


def _in_store(root: str, rel: str) -> bool:
    """Synapse's own test: `os.path.isfile` (whatever its size)."""
    try:
        return os.path.isfile(paths.in_store(root, rel))
    except paths.PathError:
        return False


def _nginx_would_answer(request: web.Request) -> bool:
    """Requests nginx would answer differently on an X-Accel-Redirect: conditionals it
    evaluates and Synapse ignores (412s, a 304 for `*`), and Range (the snippet has nginx
    ignore it, so ranges are the proxy's to answer): the proxy sends those itself."""
    return (
        "If-Match" in request.headers
        or "If-Unmodified-Since" in request.headers
        or "*" in request.headers.getall("If-None-Match", [])
        or "Range" in request.headers
    )


async def send(
    env: Env, request: web.Request, source: Source, outcome: Outcome
) -> web.StreamResponse:
    """Locate the file (store, else a fill from S3) and send it; neither: PassThrough."""
    config = env.config
    byte_range: ByteRange | None = None
    if config.ranges and source.rangeable:  # (not dataclasses.replace: 1 us more)
        source = Source(
            source.rel,
            source.length,
            source.sha256,
            [*source.headers, ("Accept-Ranges", "bytes")],
            source.rangeable,
        )
    if deciding(request):
        return decide(env, request, source, outcome)
    if config.ranges and source.rangeable:
        chosen = ranges.choose(
            request.headers.getall("Range", []),
            request.headers.getall("If-Range", []),
            source.length,
        )
        if isinstance(chosen, Unsatisfiable):  # decided by the length alone: no file needed
            outcome.source = "proxy"
            return await respond.unsatisfiable(request, h.servlet_headers(download=True), chosen)
        byte_range = chosen
    accel = bool(config.accel_redirect) and not _nginx_would_answer(request)
    found = await env.locator.locate(
        source.rel,
        source.length,
        source.sha256,
        open_hit=not accel,
        client=client_ip(request),  # fills started are capped per client address
    )
    if found is None:
        raise PassThrough
    return await _respond(env, request, source, found, outcome, byte_range)


def decide(env: Env, request: web.Request, source: Source, outcome: Outcome) -> web.Response:
    """A yes to nginx's question (the X-Accel answer of a hit, which it caches briefly and
    sends the file with), or Undecided: anything but a plain hit is the proxy's to send."""
    if not env.config.accel_redirect or _nginx_would_answer(request):
        raise Undecided
    if env.locator.stored(source.rel, source.length) is None:
        raise Undecided  # a miss: filled when the client's own request comes
    outcome.source = "cache-accel"
    return respond.accel_redirect(source.headers, env.config.accel_redirect + source.rel)


async def _respond(
    env: Env,
    request: web.Request,
    source: Source,
    found: Found,
    outcome: Outcome,
    byte_range: ByteRange | None = None,
) -> web.StreamResponse:
    sent = 0 if request.method == "HEAD" else source.length
    try:
        if isinstance(found, Hit):
            outcome.source = "cache"
            if found.fd < 0:
                assert env.config.accel_redirect
                outcome.source = "cache-accel"
                outcome.bytes = 0
                return respond.accel_redirect(
                    source.headers, env.config.accel_redirect + source.rel
                )
            response = await respond.file(
                request, source.headers, found.fd, source.length, byte_range
            )
        elif isinstance(found, Miss):
            outcome.source = "s3"
            response = await respond.fill(request, source.headers, found.fill, byte_range)
        else:
            assert isinstance(found, Direct)
            outcome.source = "s3-uncached"
            response = await respond.stream(
                request, source.headers, found.body, env.config.s3_chunk_size
            )
        outcome.bytes = sent
        return response
    except respond.ClientGone:
        outcome.bytes = -1
        raise
    finally:
        found.close()
