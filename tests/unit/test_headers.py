"""headers.py: Content-Type, Content-Disposition, ETag, error bodies and header sets.

The differential tests run Synapse's own `add_file_headers`, its media servlets'
header-setting prologue and its canonical JSON encoder (in the Synapse virtualenv, as a
subprocess) and require our output to match byte for byte.
"""

from __future__ import annotations

from typing import Any

import pytest

from media_proxy import headers
from media_proxy.headers import (
    content_disposition,
    content_type,
    download_headers,
    error_body,
    error_headers,
    is_not_modified,
    is_safe_header_value,
    not_modified_headers,
    servlet_headers,
)
from tests.unit.synapse_oracle import run_synapse

CSP = (
    "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf;"
    " style-src 'unsafe-inline'; media-src 'self'; object-src 'self';"
)
CORS_CORP = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date"),
    ("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
]
SECURITY = [
    ("Content-Security-Policy", CSP),
    ("X-Content-Security-Policy", "sandbox;"),
    ("Referrer-Policy", "no-referrer"),
]
MEDIA_CACHE = [
    ("Cache-Control", "public,max-age=86400,s-maxage=0,proxy-revalidate"),
    ("ETag", "1"),
]


# --- Content-Type ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("text/plain", "text/plain; charset=UTF-8"),
        ("TEXT/PLAIN", "TEXT/PLAIN; charset=UTF-8"),  # original case kept
        ("Text/Html", "Text/Html; charset=UTF-8"),
        ("text/css", "text/css; charset=UTF-8"),
        ("text/csv", "text/csv; charset=UTF-8"),
        ("text/calendar", "text/calendar; charset=UTF-8"),
        ("text/javascript", "text/javascript; charset=UTF-8"),
        ("text/xml", "text/xml; charset=UTF-8"),
        ("application/json", "application/json; charset=UTF-8"),
        ("application/ld+json", "application/ld+json; charset=UTF-8"),
        ("application/rtf", "application/rtf; charset=UTF-8"),
        ("image/svg+xml", "image/svg+xml; charset=UTF-8"),
        # whole-string match only: parameters or stray spaces mean "leave it alone"
        ("text/plain; charset=latin1", "text/plain; charset=latin1"),
        ("text/plain;charset=UTF-8", "text/plain;charset=UTF-8"),
        ("text/plain ", "text/plain "),
        (" text/plain", " text/plain"),
        ("text/plainx", "text/plainx"),
        ("application/javascript", "application/javascript"),
        ("image/png", "image/png"),
        ("application/octet-stream", "application/octet-stream"),
        ("", "application/octet-stream"),
        (None, "application/octet-stream"),
    ],
)
def test_content_type(media_type: str | None, expected: str) -> None:
    assert content_type(media_type) == expected


# --- Content-Disposition -----------------------------------------------------------------

# Synapse 1.163's INLINE_CONTENT_TYPES, written out (reference section 4.4).
INLINE = [
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
]


@pytest.mark.parametrize("media_type", INLINE)
def test_inline_types(media_type: str) -> None:
    assert content_disposition(media_type, None) == "inline"
    assert content_disposition(media_type.upper(), None) == "inline"
    assert content_disposition(media_type + "; charset=x", None) == "inline"


@pytest.mark.parametrize(
    "media_type",
    [
        "image/svg+xml",
        "text/html",
        "text/xml",
        "text/javascript",
        "application/javascript",
        "application/xhtml+xml",
        "application/octet-stream",
        "application/pdf",
        "image/bmp",
        "text/plain ;x=y",  # no whitespace strip before the ";"
        " text/plain",
        "text/plainx",
        "",
        None,
    ],
)
def test_attachment_types(media_type: str | None) -> None:
    assert content_disposition(media_type, None) == "attachment"


@pytest.mark.parametrize(
    ("media_type", "name", "expected"),
    [
        ("image/png", "x.png", "inline; filename=x.png"),
        ("image/png", None, "inline"),
        ("image/png", "", "inline"),
        ("text/plain", "a b/c.txt", "inline; filename*=utf-8''a%20b/c.txt"),  # "/" kept
        ("image/svg+xml", "é.svg", "attachment; filename*=utf-8''%C3%A9.svg"),
        ("text/html", "page.html", "attachment; filename=page.html"),
        ("application/pdf", "日本.pdf", "attachment; filename*=utf-8''%E6%97%A5%E6%9C%AC.pdf"),
        ("image/png", "😀.png", "inline; filename*=utf-8''%F0%9F%98%80.png"),
        ("image/png", "a/b", "inline; filename*=utf-8''a/b"),
        ("image/png", "a;b", "inline; filename*=utf-8''a%3Bb"),
        ("image/png", 'a"b', "inline; filename*=utf-8''a%22b"),
        ("image/png", "a=b", "inline; filename*=utf-8''a%3Db"),
        ("image/png", "a:b", "inline; filename*=utf-8''a%3Ab"),
        ("image/png", "a?b", "inline; filename*=utf-8''a%3Fb"),
        ("image/png", "a,b", "inline; filename*=utf-8''a%2Cb"),
        ("image/png", "a@b", "inline; filename*=utf-8''a%40b"),
        ("image/png", "[x]", "inline; filename*=utf-8''%5Bx%5D"),
        ("image/png", "{x}", "inline; filename*=utf-8''%7Bx%7D"),
        ("image/png", "(x)", "inline; filename*=utf-8''%28x%29"),
        ("image/png", "<x>", "inline; filename*=utf-8''%3Cx%3E"),
        ("image/png", "a\\b", "inline; filename*=utf-8''a%5Cb"),
        ("image/png", "a\tb", "inline; filename*=utf-8''a%09b"),
        ("image/png", "a\x7fb", "inline; filename*=utf-8''a%7Fb"),
        ("image/png", "a\r\nb", "inline; filename*=utf-8''a%0D%0Ab"),
        # every other printable ASCII character is a token character, "%" included
        ("image/png", "~!#$%&'*+-.^_`|", "inline; filename=~!#$%&'*+-.^_`|"),
        ("image/png", "%41", "inline; filename=%41"),
        (None, "x.bin", "attachment; filename=x.bin"),
    ],
)
def test_content_disposition(media_type: str | None, name: str | None, expected: str) -> None:
    assert content_disposition(media_type, name) == expected


def test_content_disposition_is_always_ascii() -> None:
    value = content_disposition("image/png", "ünïcödé \u2028 name\0.png")
    assert value.isascii()
    assert is_safe_header_value(value)


@pytest.mark.parametrize(
    ("name", "token"),
    [("x.png", True), ("", True), ("a b", False), ("é", False), ("a/b", False), ("~", True)],
)
def test_can_encode_filename_as_token(name: str, token: bool) -> None:
    assert headers.can_encode_filename_as_token(name) is token


@pytest.mark.parametrize(
    ("value", "safe"),
    [("image/png", True), ("a\rb", False), ("a\nb", False), ("a\0b", False), ("é", True)],
)
def test_is_safe_header_value(value: str, safe: bool) -> None:
    assert is_safe_header_value(value) is safe


# --- conditional requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "matches"),
    [
        ([], False),
        (["1"], True),
        (['"1"'], False),
        (["*"], False),
        (['W/"1"'], False),
        (["1, 2"], False),
        (["2, 1"], False),
        ([" 1"], False),
        (["1 "], False),
        (["01"], False),
        ([""], False),
        (["2", "1"], True),  # Twisted's getHeader: the last header wins
        (["1", "2"], False),
    ],
)
def test_is_not_modified(values: list[str], matches: bool) -> None:
    assert is_not_modified(values) is matches


# --- error bodies ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "extra", "expected"),
    [
        (
            ("M_MISSING_TOKEN", "Missing access token"),
            {},
            b'{"errcode":"M_MISSING_TOKEN","error":"Missing access token"}',
        ),
        (
            ("M_UNKNOWN_TOKEN", "Invalid access token passed."),
            {"soft_logout": False},
            b'{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.",'
            b'"soft_logout":false}',
        ),
        (
            ("M_NOT_FOUND", "Not found '/_matrix/media/v3/download/hs/\u00e9'"),
            {},
            '{"errcode":"M_NOT_FOUND","error":"Not found \'/_matrix/media/v3/download/hs/'
            "\u00e9'\"}".encode(),
        ),
        (
            ("M_LIMIT_EXCEEDED", "Too many requests"),
            {"retry_after_ms": 2000, "a": [1, None]},
            b'{"a":[1,null],"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests",'
            b'"retry_after_ms":2000}',
        ),
        (
            ("M_UNKNOWN", 'quote " and \\ and \n'),
            {},
            b'{"errcode":"M_UNKNOWN","error":"quote \\" and \\\\ and \\n"}',
        ),
    ],
)
def test_error_body(args: tuple[str, str], extra: dict[str, Any], expected: bytes) -> None:
    assert error_body(*args, **extra) == expected


# --- header sets -------------------------------------------------------------------------


def test_download_headers_exact() -> None:
    assert download_headers("image/png", 10240, "x.png") == [
        *CORS_CORP,
        *SECURITY,
        ("Content-Type", "image/png"),
        ("Content-Disposition", "inline; filename=x.png"),
        *MEDIA_CACHE,
        ("Content-Length", "10240"),
        ("X-Robots-Tag", "noindex, nofollow, noarchive, noimageindex"),
    ]


def test_download_headers_for_empty_type_and_no_name() -> None:
    got = dict(download_headers(None, 0, None))
    assert got["Content-Type"] == "application/octet-stream"
    assert got["Content-Disposition"] == "attachment"
    assert got["Content-Length"] == "0"


def test_thumbnail_headers_have_no_csp() -> None:
    got = download_headers("image/jpeg", 5, None, download=False)
    names = [name for name, _ in got]
    assert "Content-Security-Policy" not in names
    assert "X-Content-Security-Policy" not in names
    assert "Referrer-Policy" not in names
    assert got[: len(CORS_CORP)] == CORS_CORP
    assert ("ETag", "1") in got


def test_no_header_twice_and_no_extras() -> None:
    for got in (
        download_headers("text/plain", 1, "a"),
        download_headers("a/b", 1, None, download=False),
    ):
        names = [name.lower() for name, _ in got]
        assert len(names) == len(set(names))
        for absent in ("accept-ranges", "last-modified", "expires", "x-content-type-options"):
            assert absent not in names


def test_servlet_headers() -> None:
    assert servlet_headers(download=True) == [*CORS_CORP, *SECURITY]
    assert servlet_headers(download=False) == CORS_CORP


def test_not_modified_headers() -> None:
    assert not_modified_headers() == [*CORS_CORP, *SECURITY, *MEDIA_CACHE]
    assert not_modified_headers(download=False) == [*CORS_CORP, *MEDIA_CACHE]


def test_error_headers_without_servlet_headers() -> None:
    assert error_headers([]) == [
        *CORS_CORP[:4],
        ("Content-Type", "application/json"),
        ("Cache-Control", "no-cache, no-store, must-revalidate"),
    ]


def test_error_headers_keep_servlet_headers_without_duplicating_cors() -> None:
    got = error_headers(servlet_headers(download=True))
    assert got == [
        *CORS_CORP,
        *SECURITY,
        ("Content-Type", "application/json"),
        ("Cache-Control", "no-cache, no-store, must-revalidate"),
    ]


def test_error_headers_match_names_case_insensitively() -> None:
    got = error_headers([("access-control-allow-origin", "*")])
    assert [n.lower() for n, _ in got].count("access-control-allow-origin") == 1
    assert len(got) == 1 + 3 + 2


# --- differential: Synapse's own code ----------------------------------------------------


_FAKE_REQUEST = """
class FakeRequest:
    def __init__(self, path=b"/", args=None):
        self.path = path
        self.args = args or {}
        self.headers = []
    def setHeader(self, name, value):
        if isinstance(name, bytes):
            name = name.decode("ascii")
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        self.headers = [h for h in self.headers if h[0].lower() != name.lower()]
        self.headers.append([name, value])
"""

_ADD_FILE_HEADERS = (
    _FAKE_REQUEST
    + """
import json, sys
from synapse.media._base import add_file_headers
out = []
for media_type, length, name in json.load(sys.stdin):
    request = FakeRequest()
    add_file_headers(request, media_type, length, name)
    out.append(request.headers)
print(json.dumps(out))
"""
)

FILE_CASES: list[tuple[str, int, str | None]] = [
    (media_type, 1234, name)
    for media_type in [
        "image/png",
        "IMAGE/PNG",
        "image/png; charset=x",
        "text/plain",
        "TEXT/PLAIN",
        "text/plain; charset=latin1",
        "text/plain ;x=y",
        "text/html",
        "image/svg+xml",
        "application/json",
        "application/octet-stream",
        "video/mp4",
        "audio/x-flac",
        "text/xml",
        "application/rtf",
        "weird/ünïcode",
    ]
    for name in [None, "", "x.png", "a b/c.txt", "é.svg", "~!#$%&'*+-.^_`|", 'a";\\=?.txt']
] + [("image/png", 0, "z"), ("image/gif", 2**40, "日本語.gif")]


@pytest.fixture(scope="module")
def synapse_file_headers() -> list[list[list[str]]]:
    answers: list[list[list[str]]] = run_synapse(_ADD_FILE_HEADERS, FILE_CASES)
    return answers


def test_download_headers_match_add_file_headers(synapse_file_headers: list[Any]) -> None:
    prefix = servlet_headers(download=True)
    mismatches = []
    for (media_type, length, name), synapse in zip(FILE_CASES, synapse_file_headers, strict=True):
        ours = download_headers(media_type, length, name)
        assert ours[: len(prefix)] == prefix
        theirs = [(n, v) for n, v in synapse]
        if ours[len(prefix) :] != theirs:
            mismatches.append((media_type, name, ours[len(prefix) :], theirs))
    assert mismatches == []


_LISTS = """
import json
from synapse.media import _base
print(json.dumps([_base.TEXT_CONTENT_TYPES, _base.INLINE_CONTENT_TYPES]))
"""


def test_type_lists_match_synapse() -> None:
    text, inline = run_synapse(_LISTS, None)
    assert frozenset(text) == headers.TEXT_CONTENT_TYPES
    assert frozenset(inline) == headers.INLINE_CONTENT_TYPES
    assert sorted(inline) == sorted(INLINE)


# Each media servlet's prologue (server-name check, CORS, CORP, CSP...) run up to the point
# where it hands the request to the media repository, with fakes for everything else.
_SERVLETS = (
    _FAKE_REQUEST
    + """
import asyncio, json
from synapse.rest.client import media as client_media
from synapse.rest.media import download_resource, thumbnail_resource

class Recorder:
    def __getattr__(self, name):
        async def call(*args, **kwargs):
            return None
        return call
    def mark_recently_accessed(self, *args):
        pass

class Auth:
    async def get_user_by_req(self, request, allow_guest=False):
        return object()
    async def is_server_admin(self, requester):
        return False

class Servlet:
    _is_mine_server_name = staticmethod(lambda name: True)
    _server_name = "hs"
    dynamic_thumbnails = False
    prevent_media_downloads_from = []
    media_repo = Recorder()
    thumbnail_provider = Recorder()
    thumbnailer = Recorder()
    auth = Auth()

async def run(cls, path, args):
    request = FakeRequest(path, args)
    await cls.on_GET(Servlet(), request, "hs", "abcdefghijklmnopqrstuvwx")
    return request.headers

thumb_args = {b"width": [b"32"], b"height": [b"32"]}
out = {
    "legacy_download": asyncio.run(run(
        download_resource.DownloadResource, b"/_matrix/media/v3/download/hs/x", {})),
    "client_download": asyncio.run(run(
        client_media.DownloadResource, b"/_matrix/client/v1/media/download/hs/x", {})),
    "legacy_thumbnail": asyncio.run(run(
        thumbnail_resource.ThumbnailResource, b"/_matrix/media/v3/thumbnail/hs/x", thumb_args)),
    "client_thumbnail": asyncio.run(run(
        client_media.ThumbnailResource, b"/_matrix/client/v1/media/thumbnail/hs/x", thumb_args)),
}
print(json.dumps(out))
"""
)


def test_servlet_headers_match_synapse_servlets() -> None:
    got = run_synapse(_SERVLETS, None)
    for route, download in [
        ("legacy_download", True),
        ("client_download", True),
        ("legacy_thumbnail", False),
        ("client_thumbnail", False),
    ]:
        assert servlet_headers(download=download) == [(n, v) for n, v in got[route]], route


_CANONICAL = """
import json, sys
from canonicaljson import encode_canonical_json
from synapse.api.errors import cs_error
out = []
for errcode, error, extra in json.load(sys.stdin):
    out.append(encode_canonical_json(cs_error(error, errcode, **extra)).decode("utf-8"))
print(json.dumps(out))
"""

ERROR_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("M_MISSING_TOKEN", "Missing access token", {}),
    ("M_UNKNOWN_TOKEN", "Invalid access token passed.", {"soft_logout": False}),
    ("M_NOT_FOUND", "Not found '/_matrix/media/v3/download/hs/é'", {}),
    ("M_NOT_YET_UPLOADED", "Media has not been uploaded yet", {}),
    ("M_UNKNOWN", 'tab\t, quote ", backslash \\, newline \n, nul \0, \u2028 and 😀', {}),
    ("M_LIMIT_EXCEEDED", "Too many requests", {"retry_after_ms": 2000, "a": [1, None, True]}),
]


def test_error_body_matches_canonical_json() -> None:
    theirs = run_synapse(_CANONICAL, ERROR_CASES)
    for (errcode, error, extra), expected in zip(ERROR_CASES, theirs, strict=True):
        assert error_body(errcode, error, **extra) == expected.encode("utf-8"), error
