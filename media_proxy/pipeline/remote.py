"""Remote media (cached by Synapse from other homeservers): downloads and thumbnails.

`(origin, media_id)` finds the `remote_media_cache` row, whose `filesystem_id` (chosen by
this homeserver, never the origin's media id) names the files under `remote_content/` and
`remote_thumbnail/`. Each function follows Synapse's order (`get_remote_media`,
`respond_remote_thumbnail`); media Synapse would fetch over federation (no row, or a file
in neither the store nor S3) are passed to it.
"""

from __future__ import annotations

from aiohttp import web

from media_proxy import headers as h
from media_proxy import paths
from media_proxy.metadata import DatabaseError, RemoteMedia
from media_proxy.parse import Kind, MediaRequest
from media_proxy.pipeline import rules, steps
from media_proxy.pipeline.steps import Env, Outcome, PassThrough, Source


async def _checked_row(
    env: Env, request: web.Request, media: MediaRequest, outcome: Outcome, servlet: h.Headers
) -> RemoteMedia | web.StreamResponse:
    """Authorization, the origin's rules, then the row and Synapse's refusals of it."""
    denied = await steps.authorize(env, request, media, outcome)
    if denied is not None:
        return denied
    if rules.allow_remote_unsure(media):
        raise PassThrough
    config = env.config
    refusal = rules.origin_refusal(
        media,
        whitelist=config.federation_domain_whitelist,
        prevented=config.prevent_media_downloads_from,
    )
    if refusal is not None:
        return await steps.refuse(request, outcome, refusal, servlet)
    try:
        row = await env.metadata.remote_media(media.server_name, media.media_id)
    except DatabaseError:
        raise PassThrough from None
    if (
        row is None  # Synapse fetches it over federation (or refuses on a legacy route)
        or row.media_length is None
        or not steps.safe_values(row.media_type, row.upload_name)
    ):
        raise PassThrough
    if media.kind is Kind.DOWNLOAD:
        # Synapse marks a download before its row checks (a thumbnail after it is sent).
        env.metadata.mark_remote_accessed(row.origin, row.media_id)
    refusal = rules.remote_row_refusal(
        row, media.api, enable_authenticated_media=config.enable_authenticated_media
    )
    if refusal is not None:
        return await steps.refuse(request, outcome, refusal, servlet)
    return row


def _original(media: MediaRequest, row: RemoteMedia) -> str:
    try:
        return paths.remote_media(media.server_name, row.filesystem_id)
    except paths.PathError:
        raise PassThrough from None


async def _require_original(env: Env, rel: str) -> None:
    """Synapse opens the original before a 304 or a thumbnail; if it finds none anywhere it
    downloads the media again: that answer is Synapse's to give."""
    if not await steps.exists(env, rel):
        raise PassThrough


async def download(
    env: Env, request: web.Request, media: MediaRequest, outcome: Outcome
) -> web.StreamResponse:
    row = await _checked_row(env, request, media, outcome, h.servlet_headers(download=True))
    if not isinstance(row, RemoteMedia):
        return row
    assert row.media_length is not None
    rel = _original(media, row)
    if h.is_not_modified(request.headers.getall("If-None-Match", [])):
        await _require_original(env, rel)
        cached = await steps.not_modified(request, outcome, download=True)
        assert cached is not None
        return cached
    headers = h.download_headers(
        row.media_type, row.media_length, media.file_name or row.upload_name
    )
    return await steps.send(
        env, request, Source(rel, row.media_length, row.sha256, headers, rangeable=True), outcome
    )


async def thumbnail(
    env: Env, request: web.Request, media: MediaRequest, outcome: Outcome
) -> web.StreamResponse:
    row = await _checked_row(env, request, media, outcome, h.servlet_headers(download=False))
    if not isinstance(row, RemoteMedia):
        return row
    await _require_original(env, _original(media, row))
    cached = await steps.not_modified(request, outcome, download=False)
    if cached is not None:
        env.metadata.mark_remote_accessed(row.origin, row.media_id)
        return cached
    try:
        chosen = steps.choose_thumbnail(
            await env.metadata.remote_thumbnails(row.origin, row.media_id), media, env
        )
        rel = paths.remote_thumbnail(
            media.server_name,
            row.filesystem_id,
            chosen.width,
            chosen.height,
            chosen.content_type,
            chosen.method,
        )
    except (paths.PathError, DatabaseError):
        raise PassThrough from None
    assert chosen.length is not None
    source = Source(rel, chosen.length, None, steps.thumbnail_headers(chosen))
    response = await steps.send(env, request, source, outcome)
    env.metadata.mark_remote_accessed(row.origin, row.media_id)
    return response
