"""The media pipeline: parse -> authorize -> metadata -> locate -> respond.

Reads top to bottom as the story of one request for local media, a download or a thumbnail
(which differ only in the file chosen and its headers). At every point where the
proxy cannot be sure of Synapse's exact answer it returns `None`, and the server passes the
request to Synapse instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from media_proxy import headers as h
from media_proxy import paths, respond, thumbnail
from media_proxy.authorize import Authorizer, Credentials, SynapseUnavailable, credentials
from media_proxy.config import Config
from media_proxy.locate import Direct, Hit, Locator, Miss
from media_proxy.metadata import DatabaseError, LocalMedia, Metadata
from media_proxy.parse import Api, Kind, MediaRequest
from media_proxy.passthrough import client_ip


@dataclass(slots=True)
class Outcome:
    """What the request log line reports about a request."""

    # cache | cache-accel | s3 | s3-uncached | proxy (answered without bytes) | synapse
    source: str = "synapse"
    bytes: int = 0


def _servable(row: LocalMedia) -> bool:
    """Rows the proxy can answer exactly; everything else is Synapse's to answer."""
    return (
        row.media_length is not None  # pending async upload: Synapse waits, then 504
        and row.url_cache is None  # URL previews: local-only files, never in S3
        and h.is_safe_header_value(row.media_type or "")
        and h.is_safe_header_value(row.upload_name or "")
    )


def _nginx_would_answer(request: web.Request) -> bool:
    """Conditionals nginx evaluates on an X-Accel-Redirect (412s, a 304 for `*`) and Synapse
    ignores: those requests are sent by the proxy itself."""
    return (
        "If-Match" in request.headers
        or "If-Unmodified-Since" in request.headers
        or "*" in request.headers.getall("If-None-Match", [])
    )


class MediaPipeline:
    def __init__(
        self, config: Config, authorizer: Authorizer, metadata: Metadata, locator: Locator
    ) -> None:
        self.config = config
        self.authorizer = authorizer
        self.metadata = metadata
        self.locator = locator

    async def serve(
        self, request: web.Request, media: MediaRequest, outcome: Outcome
    ) -> web.StreamResponse | None:
        servlet = h.servlet_headers(download=media.kind is Kind.DOWNLOAD)
        if media.api is Api.CLIENT:
            creds = credentials(request.headers.getall("Authorization", []), media.query)
            if isinstance(creds, Credentials):
                try:
                    denied = await self.authorizer.check(creds, client_ip(request))
                except SynapseUnavailable:
                    return None
            else:
                denied = creds
            if denied is not None:
                outcome.source = "proxy"
                return await respond.error(request, denied.status, denied.body, [])

        try:
            row = await self.metadata.local_media(media.media_id)
        except DatabaseError:
            return None
        if row is None or not _servable(row):
            return None
        assert row.media_length is not None
        outcome.source = "proxy"
        if row.quarantined_by is not None:
            body = h.error_body("M_NOT_FOUND", f"Not found '{media.raw_path}'")
            return await respond.error(request, 404, body, servlet)
        if media.api is Api.LEGACY and self.config.enable_authenticated_media and row.authenticated:
            return await respond.error(
                request, 404, h.error_body("M_NOT_FOUND", "Not found"), servlet
            )

        self.metadata.mark_accessed(row.media_id)
        if h.is_not_modified(request.headers.getall("If-None-Match", [])):
            return await respond.not_modified(
                request, h.not_modified_headers(download=media.kind is Kind.DOWNLOAD)
            )

        try:
            if media.thumbnail is None:
                rel, length, sha256 = paths.local_media(row.media_id), row.media_length, row.sha256
                media_headers = h.download_headers(
                    row.media_type, length, media.file_name or row.upload_name
                )
            else:
                chosen = thumbnail.choose(
                    await self.metadata.local_thumbnails(row.media_id),
                    media.thumbnail,
                    dynamic=self.config.dynamic_thumbnails,
                )
                if chosen is None or chosen.length is None:
                    outcome.source = "synapse"
                    return None
                rel = paths.local_thumbnail(
                    row.media_id, chosen.width, chosen.height, chosen.content_type, chosen.method
                )
                length, sha256 = chosen.length, None
                media_headers = h.download_headers(
                    chosen.content_type, length, None, download=False
                )
        except (paths.PathError, DatabaseError):
            outcome.source = "synapse"
            return None
        accel = bool(self.config.accel_redirect) and not _nginx_would_answer(request)
        found = await self.locator.locate(rel, length, sha256, open_hit=not accel)
        if found is None:
            outcome.source = "synapse"
            return None
        sent = 0 if request.method == "HEAD" else length
        try:
            if isinstance(found, Hit):
                outcome.source = "cache"
                if found.fd < 0:
                    assert self.config.accel_redirect
                    outcome.source = "cache-accel"
                    outcome.bytes = 0
                    return respond.accel_redirect(media_headers, self.config.accel_redirect + rel)
                response = await respond.file(request, media_headers, found.fd, length)
            elif isinstance(found, Miss):
                outcome.source = "s3"
                response = await respond.fill(request, media_headers, found.fill)
            else:
                assert isinstance(found, Direct)
                outcome.source = "s3-uncached"
                response = await respond.stream(
                    request, media_headers, found.body, self.config.s3_chunk_size
                )
            outcome.bytes = sent
            return response
        except respond.ClientGone:
            outcome.bytes = -1
            raise
        finally:
            found.close()
