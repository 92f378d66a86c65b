"""Synapse's refusals of a media request, as pure functions over the request and its row.

Each function returns the `Refusal` Synapse would answer with, or None to go on; the order
of the checks inside each function, and the order in which the pipelines call them, is
Synapse's (reference section 4.1, 4.2, 5.1), since a request failing two checks must get
the first one's answer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from media_proxy import headers as h
from media_proxy.metadata import LocalMedia, RemoteMedia
from media_proxy.parse import Api, Kind, MediaRequest


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    errcode: str
    error: str

    def body(self) -> bytes:
        return h.error_body(self.errcode, self.error)


# `NotFoundError()`: the 404 without the path (authenticated and quarantined remote media).
NOT_FOUND = Refusal(404, "M_NOT_FOUND", "Not found")


def not_found(raw_path: str) -> Refusal:
    """`respond_404`: the 404 quoting the request's raw path."""
    return Refusal(404, "M_NOT_FOUND", f"Not found '{raw_path}'")


def federation_denied(origin: str) -> Refusal:
    return Refusal(403, "M_FORBIDDEN", f"Federation denied with {origin}.")


def allow_remote_unsure(media: MediaRequest) -> bool:
    """A legacy remote download whose `allow_remote` Synapse refuses with a 400 of its own."""
    if media.api is not Api.LEGACY or media.kind is not Kind.DOWNLOAD:
        return False
    value = media.first("allow_remote")
    return value is not None and value not in ("true", "false")


def origin_refusal(
    media: MediaRequest, *, whitelist: Collection[str] | None, prevented: Collection[str]
) -> Refusal | None:
    """Checks on a remote origin made before any row is read.

    Downloads: legacy `allow_remote=false`, then the whitelist, then
    `prevent_media_downloads_from`; thumbnails check the prevent list in the servlet,
    before the whitelist.
    """
    origin = media.server_name
    denied = whitelist is not None and origin not in whitelist
    if media.kind is Kind.THUMBNAIL:
        if origin in prevented:
            return not_found(media.raw_path)
        return federation_denied(origin) if denied else None
    if media.api is Api.LEGACY and media.first("allow_remote") == "false":
        return not_found(media.raw_path)
    if denied:
        return federation_denied(origin)
    if origin in prevented:
        return not_found(media.raw_path)
    return None


def remote_row_refusal(
    row: RemoteMedia, api: Api, *, enable_authenticated_media: bool
) -> Refusal | None:
    """`_get_remote_media_impl`: an authenticated row on a legacy route, then quarantine."""
    if api is Api.LEGACY and enable_authenticated_media and row.authenticated:
        return NOT_FOUND
    if row.quarantined_by is not None:
        return NOT_FOUND
    return None


def local_row_refusal(
    row: LocalMedia, media: MediaRequest, *, enable_authenticated_media: bool
) -> Refusal | None:
    """`get_local_media_info` (quarantine: 404 with the path), then the authenticated flag."""
    if row.quarantined_by is not None:
        return not_found(media.raw_path)
    if media.api is Api.LEGACY and enable_authenticated_media and row.authenticated:
        return NOT_FOUND
    return None
