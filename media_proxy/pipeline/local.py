"""Local media (uploaded to this homeserver): downloads and thumbnails.

Each function reads top to bottom as Synapse's own order of decisions
(`get_local_media`, `respond_local_thumbnail`); a `PassThrough` anywhere sends the request
to Synapse.
"""

from __future__ import annotations

from aiohttp import web

from media_proxy import headers as h
from media_proxy import paths
from media_proxy.metadata import DatabaseError, LocalMedia
from media_proxy.parse import MediaRequest
from media_proxy.pipeline import rules, steps
from media_proxy.pipeline.steps import Env, Outcome, PassThrough, Source


async def _row(env: Env, media: MediaRequest) -> LocalMedia:
    """The media row, when the proxy can answer for it exactly."""
    try:
        row = await env.metadata.local_media(media.media_id)
    except DatabaseError:
        raise PassThrough from None
    if (
        row is None
        or row.media_length is None  # pending async upload: Synapse waits, then 504
        or row.url_cache is not None  # URL previews: local-only files, never in S3
        or not steps.safe_values(row.media_type, row.upload_name)
    ):
        raise PassThrough
    return row


async def _checked_row(
    env: Env, request: web.Request, media: MediaRequest, outcome: Outcome, servlet: h.Headers
) -> LocalMedia | web.StreamResponse:
    """Authorization, then the row and Synapse's refusals of it."""
    denied = await steps.authorize(env, request, media, outcome)
    if denied is not None:
        return denied
    row = await _row(env, media)
    refusal = rules.local_row_refusal(
        row, media, enable_authenticated_media=env.config.enable_authenticated_media
    )
    if refusal is not None:
        return await steps.refuse(request, outcome, refusal, servlet)
    return row


async def download(
    env: Env, request: web.Request, media: MediaRequest, outcome: Outcome
) -> web.StreamResponse:
    row = await _checked_row(env, request, media, outcome, h.servlet_headers(download=True))
    if not isinstance(row, LocalMedia):
        return row
    assert row.media_length is not None
    env.metadata.mark_accessed(row.media_id)
    cached = await steps.not_modified(request, outcome, download=True)
    if cached is not None:
        return cached
    try:
        rel = paths.local_media(row.media_id)
    except paths.PathError:
        raise PassThrough from None
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
    if not isinstance(row, LocalMedia):
        return row
    env.metadata.mark_accessed(row.media_id)
    cached = await steps.not_modified(request, outcome, download=False)
    if cached is not None:
        return cached
    try:
        chosen = steps.choose_thumbnail(
            await env.metadata.local_thumbnails(row.media_id), media, env
        )
        rel = paths.local_thumbnail(
            row.media_id, chosen.width, chosen.height, chosen.content_type, chosen.method
        )
    except (paths.PathError, DatabaseError):
        raise PassThrough from None
    assert chosen.length is not None
    source = Source(rel, chosen.length, None, steps.thumbnail_headers(chosen))
    return await steps.send(env, request, source, outcome)
