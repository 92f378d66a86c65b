"""Step 1 of a request: decide from the request line alone whether the proxy may answer it.

`parse` returns a `MediaRequest` for the downloads the proxy serves itself and None for
everything else, which is passed to Synapse unchanged. Matching follows Synapse: the
patterns run on the raw (percent-encoded) path and each captured group is unquoted after.
Anything Synapse would refuse with an error of its own (a bad server name, a bad
`timeout_ms`, an admin quarantine bypass) is left to Synapse, so its answer stays exact.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from typing import Final

Query = dict[str, list[str]]


class Api(enum.Enum):
    """Which family of routes a request came in on; they differ in auth and flags."""

    CLIENT = "client"  # /_matrix/client/v1/media: access token required
    LEGACY = "legacy"  # /_matrix/media/{r0,v3,v1}: no token; `authenticated` media hidden


class Kind(enum.Enum):
    DOWNLOAD = "download"
    THUMBNAIL = "thumbnail"


@dataclass(frozen=True, slots=True)
class ThumbnailParams:
    width: int
    height: int
    method: str  # as given (Synapse lowercases it for selection, not for exact matches)
    desired_type: str  # image/webp when animated=true, else image/png; Accept is ignored


@dataclass(frozen=True, slots=True)
class MediaRequest:
    api: Api
    kind: Kind
    server_name: str
    media_id: str
    file_name: str  # "" when absent: the stored upload name is used
    raw_path: str  # percent-encoded, without query: Synapse quotes it in its 404s
    query: Query
    thumbnail: ThumbnailParams | None = None

    def first(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


_DOWNLOAD: Final = re.compile(
    r"^/_matrix/(?:(?P<client>client/v1/media)|media/(?:r0|v3|v1))/download/"
    r"(?P<server_name>[^/]*)/(?P<media_id>[^/]*)(?:/(?P<file_name>[^/]*))?$"
)
_THUMBNAIL: Final = re.compile(
    r"^/_matrix/(?:(?P<client>client/v1/media)|media/(?:r0|v3|v1))/thumbnail/"
    r"(?P<server_name>[^/]*)/(?P<media_id>[^/]*)$"
)
ANIMATED_THUMBNAIL_TYPE: Final = "image/webp"
_QUERY_SEPARATOR: Final = re.compile("[&;]")
_HOST: Final = re.compile(r"\A[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*\Z")


def _unquote(group: str | None) -> str:
    return urllib.parse.unquote(group) if group else ""


def parse_query(raw_query: str) -> Query:
    """Query arguments as Twisted gives them to Synapse: split on `&` and `;`, items without
    `=` dropped, blank values kept, order kept (the first value is the one Synapse reads)."""
    query: Query = {}
    for item in _QUERY_SEPARATOR.split(raw_query):
        name, eq, value = item.partition("=")
        if eq:
            query.setdefault(urllib.parse.unquote_plus(name), []).append(
                urllib.parse.unquote_plus(value)
            )
    return query


def valid_server_name(server_name: str) -> bool:
    """Synapse's `parse_and_validate_server_name`, as a predicate."""
    host = server_name
    if not server_name.endswith("]") and ":" in server_name:
        host, _, port = server_name.rpartition(":")
        try:
            int(port)
        except ValueError:
            return False
    if host.startswith("["):
        if not host.endswith("]") or "%" in host:  # no zone ids, as in Synapse
            return False
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            return False
        return True
    return bool(_HOST.match(host))


def _valid_non_negative_int(value: str) -> bool:
    """Synapse runs int() on the raw bytes: non-ASCII digits and spaces are refused."""
    try:
        return int(value.encode()) >= 0
    except (ValueError, UnicodeEncodeError):
        return False


def _thumbnail_params(query: Query) -> ThumbnailParams | None:
    """Synapse's width, height, method and animated parameters; None where it would refuse."""
    width, height = query.get("width"), query.get("height")
    if not width or not height:
        return None  # 400 M_MISSING_PARAM
    if not (_valid_non_negative_int(width[0]) and _valid_non_negative_int(height[0])):
        return None  # 400 M_INVALID_PARAM
    method = query.get("method", ["scale"])[0]
    if not method.isascii():
        return None
    animated = query.get("animated", ["false"])[0]
    if animated not in ("true", "false"):
        return None
    return ThumbnailParams(
        width=int(width[0].encode()),
        height=int(height[0].encode()),
        method=method,
        desired_type=ANIMATED_THUMBNAIL_TYPE if animated == "true" else "image/png",
    )


def parse(method: str, raw_target: str) -> MediaRequest | None:
    """A download or thumbnail the proxy may answer itself, or None to pass the request on."""
    if method not in ("GET", "HEAD"):
        return None
    raw_path, _, raw_query = raw_target.partition("?")
    kind = Kind.DOWNLOAD
    match = _DOWNLOAD.match(raw_path)
    if match is None:
        kind, match = Kind.THUMBNAIL, _THUMBNAIL.match(raw_path)
        if match is None:
            return None
    server_name = _unquote(match["server_name"])
    if not valid_server_name(server_name):
        return None  # Synapse answers 500; let it
    query = parse_query(raw_query)
    timeout = query.get("timeout_ms")
    if timeout and not _valid_non_negative_int(timeout[0]):
        return None  # Synapse's 400 M_INVALID_PARAM
    api = Api.CLIENT if match["client"] else Api.LEGACY
    thumbnail = None
    if kind is Kind.THUMBNAIL:
        thumbnail = _thumbnail_params(query)
        if thumbnail is None:
            return None
    elif api is Api.CLIENT and "admin_unsafely_bypass_quarantine" in query:
        return None  # needs an admin check only Synapse can make
    return MediaRequest(
        api=api,
        kind=kind,
        server_name=server_name,
        media_id=_unquote(match["media_id"]),
        file_name=_unquote(match.groupdict().get("file_name")),
        raw_path=raw_path,
        query=query,
        thumbnail=thumbnail,
    )
