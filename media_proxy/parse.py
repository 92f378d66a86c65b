"""Step 1 of a request: decide from the request line alone whether the proxy may answer it.

`parse` returns a `MediaRequest` for the downloads the proxy serves itself and None for
everything else, which is passed to Synapse unchanged. Matching follows Synapse: the
patterns run on the raw (percent-encoded) path and each captured group is unquoted after.
Anything Synapse would refuse with an error of its own (a bad server name, a bad
`timeout_ms`, an admin quarantine bypass) is left to Synapse, so its answer stays exact.

`read_head` comes first: it reads a request head (request line and header lines) with the
rules of Synapse's HTTP server, Twisted, so that aiohttp never serves a request Twisted
would refuse, and rewrites the few targets an HTTP client could not forward verbatim.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

Query = dict[str, list[str]]


class Api(enum.Enum):
    """Which family of routes a request came in on; they differ in auth and flags."""

    CLIENT = "client"  # /_matrix/client/v1/media: access token required
    LEGACY = "legacy"  # /_matrix/media/{r0,v3,v1}: no token; `authenticated` media hidden
    FEDERATION = "federation"  # /_matrix/federation/v1/media: X-Matrix signature, local media


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
    server_name: str  # "" on federation routes: they name no server (local media only)
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
# Federation media (Synapse's BaseFederationServlet patterns): no server name, no file name.
_FEDERATION: Final = re.compile(
    r"^/_matrix/federation/v1/media/(?P<kind>download|thumbnail)/(?P<media_id>[^/]*)$"
)
ANIMATED_THUMBNAIL_TYPE: Final = "image/webp"
_QUERY_SEPARATOR: Final = re.compile("[&;]")
_HOST: Final = re.compile(r"\A[0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*\Z")
# A percent-escape of a byte above 0x7F: the parameter is not ASCII once decoded.
_NON_ASCII_ESCAPE: Final = re.compile("%[89a-fA-F][0-9a-fA-F]")

# Twisted 26 (twisted.web.http.HTTPChannel, LineReceiver), Synapse's HTTP server.
MAX_HEAD: Final = 16384  # totalHeadersSize: request line and header lines together
MAX_LINE: Final = 16384  # LineReceiver.MAX_LENGTH: one line (Twisted drops the connection)
MAX_HEADERS: Final = 500  # maxHeaders
_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TWISTED_TARGET: Final = re.compile(rb"[\x21-\xb0]+")  # Twisted's bound: 0xB0, not 0x7E
_VERSIONS: Final = (b"HTTP/1.1", b"HTTP/1.0")


class BadRequest(ValueError):
    """A request head Twisted answers with its bare 400 (or by closing); the message names
    the rule, never the bytes (a query may carry an access token)."""


def _is_token(value: bytes) -> bool:
    return _TOKEN.fullmatch(value) is not None


def read_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """Twisted's `_parseRequestLine`: exactly three fields split on single spaces, a token
    method, a target of bytes 0x21 to 0xB0 (Twisted's bound, not RFC 9112's 0x7E), and
    HTTP/1.0 or HTTP/1.1. Everything else is a 400 from Synapse."""
    fields = line.split(b" ")
    if len(fields) != 3:
        raise BadRequest("request line is not three fields split by single spaces")
    method, target, version = fields
    if not _is_token(method):
        raise BadRequest("method is not a token")
    if _TWISTED_TARGET.fullmatch(target) is None:
        raise BadRequest("request target is empty or has a byte Twisted refuses")
    if version not in _VERSIONS:
        raise BadRequest("version is not HTTP/1.0 or HTTP/1.1")
    return method, target, version


def _origin_target(target: bytes) -> bytes:
    """The target to give aiohttp (and later Synapse) for a target Twisted accepted."""
    if not target.isascii():
        # Twisted accepts bytes 0x80-0xB0, but Synapse then fails to decode the path as
        # ASCII and drops the connection without an answer (observed): refuse it cleanly.
        raise BadRequest("request target is not ASCII")
    if not target.startswith(b"/"):
        # Twisted routes on target[1:] split at "/". Absolute-form ("http://host/p") makes a
        # first segment with a colon ("ttp:"), a child no Synapse resource has: its 404
        # comes before any servlet looks at the path, so "/" + target[1:] gets the same one.
        first = target[1:].split(b"/", 1)[0]
        if b":" not in first:
            raise BadRequest("request target is neither origin-form nor absolute-form")
        target = b"/" + target[1:]
    # "#" is part of the path and query for Twisted, but an HTTP client cuts it off as a
    # fragment, and aiohttp refuses DEL. Escaped, Synapse decodes the same path segments
    # and parameters (only the path its 404 quotes shows the escape).
    if b"#" in target or b"\x7f" in target:
        target = target.replace(b"#", b"%23").replace(b"\x7f", b"%7F")
    return target


def read_head(lines: Sequence[bytes]) -> list[bytes]:
    """A request head (lines without CRLF, the last one empty) as Twisted reads it.

    Raises BadRequest where Twisted refuses the head; returns the lines for aiohttp's parser:
    the target made forwardable (`_origin_target`), folded header lines unfolded as Twisted
    joins them. Twisted's other checks on headers are applied too: a colon in every line,
    token names, no NUL in values, digits-only Content-Length, chunked or identity
    Transfer-Encoding, one framing header, at most 500 headers, 16 KiB for the whole head.
    """
    if not lines or not lines[0]:
        raise BadRequest("empty request line")
    lengths = list(map(len, lines))
    if sum(lengths) > MAX_HEAD:
        raise BadRequest("request head larger than 16 KiB")
    if max(lengths) > MAX_LINE:
        raise BadRequest("line longer than 16 KiB")
    method, target, version = read_request_line(lines[0])
    if method != method.upper():
        # Synapse answers such a method itself (405 or 404), but an HTTP client sends
        # methods upper-cased, so it cannot be forwarded as it came; nginx refuses it too.
        raise BadRequest("method not in upper case")
    headers: list[bytes] = []
    for line in lines[1:]:
        if not line:
            break
        if line[0] in b" \t" and headers:
            headers[-1] += b" " + line.lstrip(b" \t")
        else:
            headers.append(line)
    if len(headers) > MAX_HEADERS:
        raise BadRequest("more than 500 headers")
    framing = 0
    for header in headers:
        name, colon, value = header.partition(b":")
        if not colon:
            raise BadRequest("header line without a colon")
        if not _is_token(name):
            raise BadRequest("header name is not a token")
        value = value.strip(b" \t")
        if b"\0" in value:
            raise BadRequest("NUL in a header value")
        lowered = name.lower()
        if lowered == b"content-length":
            if not value.isdigit():
                raise BadRequest("Content-Length is not digits")
            framing += 1
        elif lowered == b"transfer-encoding":
            if value.lower() == b"chunked":
                framing += 1
            elif value.lower() != b"identity":
                raise BadRequest("Transfer-Encoding is neither chunked nor identity")
        if framing > 1:
            raise BadRequest("more than one Content-Length or Transfer-Encoding")
    request_line = b" ".join((method, _origin_target(target), version))
    return [request_line, *headers, b""]


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
    if not raw_target.isascii() or _NON_ASCII_ESCAPE.search(raw_query):
        # Synapse decodes the parameters it reads as ASCII (every value of a string
        # parameter, the access token) and refuses or fails on others: its call.
        return None
    kind = Kind.DOWNLOAD
    match = _DOWNLOAD.match(raw_path)
    if match is None:
        kind, match = Kind.THUMBNAIL, _THUMBNAIL.match(raw_path)
        if match is None:
            return _federation(raw_path, raw_query)
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


def _federation(raw_path: str, raw_query: str) -> MediaRequest | None:
    """A federation download or thumbnail; its query rules are the client API's."""
    match = _FEDERATION.match(raw_path)
    if match is None:
        return None
    kind = Kind(match["kind"])
    query = parse_query(raw_query)
    timeout = query.get("timeout_ms")
    if timeout and not _valid_non_negative_int(timeout[0]):
        return None  # Synapse's 400 M_INVALID_PARAM, after authentication
    thumbnail = None
    if kind is Kind.THUMBNAIL:
        thumbnail = _thumbnail_params(query)
        if thumbnail is None:
            return None
    return MediaRequest(
        api=Api.FEDERATION,
        kind=kind,
        server_name="",
        media_id=_unquote(match["media_id"]),
        file_name="",
        raw_path=raw_path,
        query=query,
        thumbnail=thumbnail,
    )
