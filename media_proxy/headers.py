"""Synapse's response header rules, kept as data and pure functions.

Clients must not be able to tell the proxy from Synapse, and the inline/attachment and
charset rules are what keeps uploaded HTML or SVG from running on the homeserver's origin,
so these tables mirror Synapse 1.163 exactly (see the table-driven tests).
"""

from __future__ import annotations

import json
import urllib.parse
from typing import Any, Final

# Types that get "; charset=UTF-8" when the stored type matches one as a whole string.
TEXT_CONTENT_TYPES: Final = frozenset(
    {
        "text/css",
        "text/csv",
        "text/html",
        "text/calendar",
        "text/plain",
        "text/javascript",
        "application/json",
        "application/ld+json",
        "application/rtf",
        "image/svg+xml",
        "text/xml",
    }
)

# Types a browser may render inline. SVG and HTML are deliberately absent.
INLINE_CONTENT_TYPES: Final = frozenset(
    {
        "text/css",
        "text/plain",
        "text/csv",
        "application/json",
        "application/ld+json",
        "image/jpeg",
        "image/gif",
        "image/png",
        "image/apng",
        "image/webp",
        "image/avif",
        "video/mp4",
        "video/webm",
        "video/ogg",
        "video/quicktime",
        "audio/mp4",
        "audio/webm",
        "audio/aac",
        "audio/mpeg",
        "audio/ogg",
        "audio/wave",
        "audio/wav",
        "audio/x-wav",
        "audio/x-pn-wav",
        "audio/flac",
        "audio/x-flac",
    }
)

# RFC 2616 separators: a file name containing one must use the filename* form.
_FILENAME_SEPARATORS: Final = frozenset('()<>@,;:\\"/[]?={}')

IMMUTABLE_ETAG: Final = "1"

CORS: Final[tuple[tuple[str, str], ...]] = (
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date"),
    ("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server"),
)
CORP: Final = (("Cross-Origin-Resource-Policy", "cross-origin"),)
# Set by the download servlets (not the thumbnail ones) before any media lookup.
DOWNLOAD_SECURITY: Final = (
    (
        "Content-Security-Policy",
        "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf;"
        " style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
    ),
    ("X-Content-Security-Policy", "sandbox;"),
    ("Referrer-Policy", "no-referrer"),
)
MEDIA_CACHE: Final = (
    ("Cache-Control", "public,max-age=86400,s-maxage=0,proxy-revalidate"),
    ("ETag", IMMUTABLE_ETAG),
)
ROBOTS: Final = (("X-Robots-Tag", "noindex, nofollow, noarchive, noimageindex"),)
ERROR_CACHE_CONTROL: Final = "no-cache, no-store, must-revalidate"

Headers = list[tuple[str, str]]


def content_type(media_type: str | None) -> str:
    """The Content-Type header for a stored media type."""
    media_type = media_type or "application/octet-stream"
    if media_type.lower() in TEXT_CONTENT_TYPES:
        return media_type + "; charset=UTF-8"
    return media_type


def can_encode_filename_as_token(name: str) -> bool:
    return all(32 < ord(c) < 127 and c not in _FILENAME_SEPARATORS for c in name)


def content_disposition(media_type: str | None, upload_name: str | None) -> str:
    media_type = media_type or "application/octet-stream"
    kind = "inline" if media_type.lower().split(";", 1)[0] in INLINE_CONTENT_TYPES else "attachment"
    if not upload_name:
        return kind
    if can_encode_filename_as_token(upload_name):
        return f"{kind}; filename={upload_name}"
    return f"{kind}; filename*=utf-8''{urllib.parse.quote(upload_name.encode('utf-8'))}"


def is_safe_header_value(value: str) -> bool:
    """Header values from the database must not smuggle a line break or NUL."""
    return "\r" not in value and "\n" not in value and "\0" not in value


def servlet_headers(*, download: bool) -> Headers:
    """Headers a media servlet sets before looking the media up (so on its 404s too)."""
    headers = [*CORS, *CORP]
    if download:
        headers.extend(DOWNLOAD_SECURITY)
    return headers


def download_headers(
    media_type: str | None, length: int, upload_name: str | None, *, download: bool = True
) -> Headers:
    """The full header set of a 200 media response, in Synapse's order."""
    return [
        *servlet_headers(download=download),
        ("Content-Type", content_type(media_type)),
        ("Content-Disposition", content_disposition(media_type, upload_name)),
        *MEDIA_CACHE,
        ("Content-Length", str(length)),
        *ROBOTS,
    ]


def not_modified_headers(*, download: bool = True) -> Headers:
    return [*servlet_headers(download=download), *MEDIA_CACHE]


def is_not_modified(if_none_match: list[str]) -> bool:
    """Synapse compares the last If-None-Match header with "1", byte for byte."""
    return bool(if_none_match) and if_none_match[-1] == IMMUTABLE_ETAG


def error_body(errcode: str, error: str, **extra: Any) -> bytes:
    """A Matrix error in Synapse's canonical JSON (sorted keys, no spaces, UTF-8)."""
    body = {"errcode": errcode, "error": error, **extra}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def error_headers(servlet: Headers) -> Headers:
    """Headers of an error response, after whatever the servlet had already set."""
    names = {name.lower() for name, _ in servlet}
    headers = list(servlet)
    for name, value in CORS:
        if name.lower() not in names:
            headers.append((name, value))
    headers.append(("Content-Type", "application/json"))
    headers.append(("Cache-Control", ERROR_CACHE_CONTROL))
    return headers
