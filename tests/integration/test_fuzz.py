"""Bad input, differential: raw request bytes sent to media-proxy and to Synapse over sockets.

Real parts: SeaweedFS (S3), Synapse (SQLite and PostgreSQL), media-proxy in front of it (fixture
`proxy`, 3 workers); for the X-Accel test also nginx (the shipped site, X-Accel mode) and a
stand-in upstream (see `HostileUpstream`).

Hypothesis builds request heads from request-line variants (separators, methods, versions,
absolute-form), paths (encoded, control and non-ASCII characters, traversal, own and foreign
server names), query strings (repeated and invalid-UTF-8 keys and values, thumbnail parameters
twice) and header variants (folded, bad names, NUL, framing, heads over Twisted's 16 KiB).
Sockets, not an HTTP client: clients normalize exactly what matters here. Each head goes to
both, and:
- the proxy never answers 500 unless Synapse does (it does for invalid server names);
- a 200 from the proxy is a 200 from Synapse with the same body;
- the statuses are equal, but for heads the proxy refuses with a 400 though Twisted reads
  them (`REFUSED_THOUGH_TWISTED_ACCEPTS` in tests/unit/test_parse.py; Synapse never sends
  media for those), heads Synapse drops without an answer (bytes 0x80-0xB0 in the target),
  and HTTP/1.1 without Host (aiohttp's 400; nginx always sends Host); a non-ASCII
  Authorization header goes to Synapse, which fails on it with its 500 (so does the proxy);
- no answer carries a canary file lying next to the media store, no file outside the store
  changes, and the proxy's log stays one JSON event per line, without a traceback;
- behind the shipped nginx site (which refuses most odd heads itself and rewrites request
  lines), the same heads get the same status (and 200 body) as with Synapse in the proxy's
  place, but for the target bytes above 0x7F that nginx passes and Synapse drops (nginx's
  502, the proxy's 400).
Seeded with media in the store and evicted (filled from S3 again on first use). Bounded and
derandomized: a fixed set of examples per property, no example database.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack.nginx import Nginx
from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.synapse import Synapse
from media_proxy import parse, paths
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Media, evict, request, settle_fills, sql, upload
from tests.unit.test_parse import REFUSED_THOUGH_TWISTED_ACCEPTS

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CANARY = b"canary-" + os.urandom(16).hex().encode()


# ---------------------------------------------------------------------------------------------
# Raw HTTP


@dataclass
class Raw:
    status: int | None  # None: the connection closed without an answer
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def send(url: str, head: bytes, *, method: bytes = b"GET", timeout: float = 30) -> Raw:
    """Send `head` as it is, read until the server closes, parse what came back."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout) as s:
        s.sendall(head)
        chunks = []
        try:
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    data = b"".join(chunks)
    if not data:
        return Raw(None, [], b"")
    top, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.split(b"\r\n")
    headers = []
    for line in header_lines:
        name, _, value = line.decode("latin1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    if ("transfer-encoding", "chunked") in headers:
        body = _dechunk(body)
    if method == b"HEAD":
        body = b""
    return Raw(int(status_line.split(b" ")[1]), headers, body)


# ---------------------------------------------------------------------------------------------
# Seed data


@dataclass
class Seeds:
    server_name: str
    token: str
    hit: Media  # in the store
    evicted: Media  # only in S3 (back in the store after its first fill)
    picture: Media  # a PNG with thumbnails, evicted


@pytest.fixture(scope="module")
def seeds(synapse: Synapse, user_token: str) -> Seeds:
    sn = synapse.server_name
    hit = upload(
        synapse.url,
        user_token,
        b"hit " * 500,
        content_type="text/plain",
        name="a.txt",
        server_name=sn,
    )
    evicted = upload(
        synapse.url,
        user_token,
        os.urandom(7000),
        content_type="image/jpeg",
        name="b c.jpg",
        server_name=sn,
    )
    picture = upload(
        synapse.url,
        user_token,
        png(320, 240, 7),
        content_type="image/png",
        name="p.png",
        server_name=sn,
    )
    for media in (hit, evicted, picture):
        # rows from before authenticated media: the legacy routes serve them too
        sql(
            synapse,
            "UPDATE local_media_repository SET authenticated = ? WHERE media_id = ?",
            False,
            media.media_id,
        )
    evict(synapse, evicted)
    evict(synapse, picture)
    evict_thumbnails(synapse, picture)
    # Next to the store, where a traversal out of it would land.
    (synapse.media_store_path.parent / "canary.txt").write_bytes(CANARY)
    (synapse.media_store_path / "canary.txt").write_bytes(CANARY)
    return Seeds(sn, user_token, hit, evicted, picture)


def outside_store(synapse: Synapse, proxy: MediaProxy) -> dict[str, tuple[int, int]]:
    """Size and mtime of every file of Synapse's and the proxy's directories outside the
    media store, but for the logs and Synapse's database (which change by themselves)."""
    files = {}
    for root in (synapse.workdir, proxy.workdir):
        for path in root.rglob("*"):
            if synapse.media_store_path in path.parents or not path.is_file():
                continue
            if path.name.startswith("homeserver.db") or ".log" in path.name:
                continue
            info = path.stat()
            files[str(path)] = (info.st_size, info.st_mtime_ns)
    return files


class LogWatch:
    """Lines the proxy logged since this was made: each must be one JSON event."""

    def __init__(self, proxy: MediaProxy) -> None:
        self.path = proxy.log_path
        self.offset = self.path.stat().st_size

    def events(self) -> list[dict[str, Any]]:
        with self.path.open("rb") as f:
            f.seek(self.offset)
            lines = f.read().decode(errors="replace").splitlines()
        events = []
        for line in lines:
            event = json.loads(line)  # a non-JSON line fails the test here
            assert "exception" not in event and "Traceback" not in line, line[:2000]
            events.append(event)
        return events


# ---------------------------------------------------------------------------------------------
# Strategies: pieces of request heads


def _encode(text: str, how: int) -> str:
    """A path segment or parameter: as is (0), percent-encoded (1), or partly (2)."""
    if how == 0:
        return text
    if how == 1:
        return urllib.parse.quote(text, safe="")
    return "".join(urllib.parse.quote(c, safe="") if i % 2 else c for i, c in enumerate(text))


ODD_TEXT = st.text(
    alphabet=st.sampled_from(list("aZ09-_.~%+#;&=?/ \t\x00\x01\x0a\x0d\x1f\x7f\u00e9\u2603\ud7ff")),
    max_size=6,
)
# Byte-level oddities spliced into a target: controls, DEL, Twisted's 0xB0 bound, UTF-8.
ODD_BYTES = st.sampled_from(
    [
        b"\x00",
        b"\x01",
        b"\x7f",
        b"\x80",
        b"\xb0",
        b"\xb1",
        b"\xff",
        b"\xc3\xa9",
        b"#",
        b"%",
        b"%zz",
        b"%00",
        b"%0A",
        b"%7F",
        b"%FF",
        b"%C3%A9",
        b"..",
        b"%2F",
        b"%2E%2E",
        b"//",
    ]
)
SEPARATORS = st.sampled_from([b" "] * 6 + [b"  ", b"\t", b" \t"])
VERSIONS = st.sampled_from(
    [b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/1.10"]
)
METHODS = st.sampled_from(
    [b"GET"] * 6 + [b"HEAD", b"HEAD", b"get", b"Get", b"FOO", b"G@T", b"OPTIONS", b"DELETE"]
)
PREFIXES = st.sampled_from([b""] * 8 + [b"http://x", b"https://h:1", b"X", b"//"])


@st.composite
def media_paths(draw: st.DrawFn, seeds: Seeds) -> bytes:
    """A download or thumbnail path on any of the media routes, mostly for seeded media."""
    api = draw(
        st.sampled_from(
            [
                "/_matrix/media/v3",
                "/_matrix/media/r0",
                "/_matrix/media/v1",
                "/_matrix/client/v1/media",
            ]
        )
    )
    kind = draw(st.sampled_from(["download", "download", "thumbnail"]))
    server = draw(
        st.sampled_from(
            [seeds.server_name] * 6
            + ["bad_server!", "", f"{seeds.server_name}%3A8448", "%5B::1%5D", "ex%00ample.org"]
        )
    )
    known = [seeds.hit.media_id, seeds.evicted.media_id, seeds.picture.media_id]
    media_id = draw(
        st.sampled_from(known * 3 + ["..%2F..%2Fcanary.txt", "..", "canary.txt", "abc"])
    )
    if draw(st.booleans()):
        media_id += _encode(draw(ODD_TEXT), draw(st.integers(0, 2)))
    path = f"{api}/{kind}/{server}/{media_id}"
    if kind == "download" and draw(st.booleans()):
        path += "/" + _encode(
            draw(st.sampled_from(["x.txt", "..", "%2E%2E", "a b"])) + draw(ODD_TEXT),
            draw(st.integers(0, 2)),
        )
    raw = bytearray(path.encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        at = draw(st.integers(len(api) + 1, len(raw)))
        raw[at:at] = draw(ODD_BYTES)
    return bytes(raw)


PARAM_NAMES = st.sampled_from(
    [
        "width",
        "height",
        "method",
        "animated",
        "timeout_ms",
        "allow_remote",
        "allow_redirect",
        "access_token",
        "user_id",
        "admin_unsafely_bypass_quarantine",
        "%FF",
        "wid%FFth",
        "width%00",
        "w%69dth",
        "a",
    ]
)
PARAM_VALUES = st.sampled_from(
    [
        "32",
        "96",
        "640",
        "0",
        "-1",
        "+5",
        "5_0",
        " 5",
        "crop",
        "scale",
        "CROP",
        "fit",
        "true",
        "false",
        "",
        "%FF",
        "%C3%A9",
        "32%FF",
        "%00",
        "abc",
        "1e3",
    ]
)


@st.composite
def queries(draw: st.DrawFn) -> bytes:
    """A query string: repeated keys, invalid UTF-8, thumbnail parameters twice, `;`."""
    items = []
    if draw(st.booleans()):
        items += [
            f"width={draw(st.sampled_from(['32', '96', '320']))}",
            f"height={draw(st.sampled_from(['32', '96', '240']))}",
        ]
    for _ in range(draw(st.integers(0, 4))):
        name, value = draw(PARAM_NAMES), draw(PARAM_VALUES)
        items.append(f"{name}={value}" if draw(st.integers(0, 5)) else name)
    draw(st.randoms()).shuffle(items)
    separator = draw(st.sampled_from(["&", "&", ";"]))
    return separator.join(items).encode()


@st.composite
def header_blocks(draw: st.DrawFn, token: str) -> list[bytes]:
    """Header lines: auth variants plus oddities Twisted and aiohttp read differently."""
    lines = [b"Host: example.test"] if draw(st.integers(0, 9)) else []
    auth = draw(st.sampled_from(["bearer", "bearer", "none", "junk", "two"]))
    if auth == "bearer":
        lines.append(f"Authorization: Bearer {token}".encode())
    elif auth == "junk":
        lines.append(b"Authorization: Bearer \xff\xfe")
    elif auth == "two":
        lines += [f"Authorization: Bearer {token}".encode()] * 2
    extras = [
        b"If-None-Match: 1",
        b"Range: bytes=0-3",
        b"X-Forwarded-For: 10.0.0.1",
        b"Accept: */*",
        b"X-Folded: a",
        b"  folded on",
        b"Bad Name: v",
        b"NoColon",
        b"X-Nul: a\x00b",
        b"Content-Length: 0",
        b"Content-Length: +0",
        b"Transfer-Encoding: gzip",
        b"Expect: nonsense",  # Twisted ignores it (test_serving checks the clean case)
        b"X-Utf8: \xc3\xa9",
        b"X-Long: " + b"l" * 8000,  # two of these exceed Twisted's 16 KiB, not nginx's 32k
    ]
    lines += draw(st.lists(st.sampled_from(extras), max_size=3))
    lines.append(b"Connection: close")
    return lines


@st.composite
def heads(draw: st.DrawFn, seeds: Seeds) -> tuple[bytes, bytes]:
    """(method, head): a whole request head, CRLF-terminated, without a body."""
    method = draw(METHODS)
    target = draw(PREFIXES) + draw(media_paths(seeds))
    query = draw(queries())
    if query or draw(st.integers(0, 9)) == 0:
        target += b"?" + query
    line = method + draw(SEPARATORS) + target + draw(SEPARATORS) + draw(VERSIONS)
    if draw(st.integers(0, 19)) == 0:
        line += b" "
    return method, b"\r\n".join([line, *draw(header_blocks(seeds.token)), b"", b""])


# ---------------------------------------------------------------------------------------------
# The comparison


def _refused_though_twisted_accepts(head: bytes) -> bool:
    lines = head.split(b"\r\n")[:-1]
    try:
        parse.read_head(lines)
    except parse.BadRequest as e:
        return any(rule in str(e) for rule in REFUSED_THOUGH_TWISTED_ACCEPTS)
    return False


def _no_host_in_http11(head: bytes) -> bool:
    """aiohttp refuses an HTTP/1.1 request without Host (RFC 9112 says it must); Twisted
    does not check. nginx always sends one."""
    lines = head.split(b"\r\n")
    return lines[0].endswith(b" HTTP/1.1") and not any(
        line[:5].lower() == b"host:" for line in lines[1:]
    )


def compare(proxy: MediaProxy, synapse: Synapse, method: bytes, head: bytes) -> None:
    theirs = send(synapse.url, head, method=method)
    ours = send(proxy.url, head, method=method)
    assert CANARY not in ours.body and CANARY not in theirs.body, head
    if ours.status == 500:
        assert theirs.status == 500, (head, ours, theirs)
    if ours.status == 200:
        assert theirs.status == 200 and ours.sha256 == theirs.sha256, (head, ours, theirs)
    if theirs.status is None or _refused_though_twisted_accepts(head) or _no_host_in_http11(head):
        # Synapse drops the connection (bytes 0x80-0xB0), or answers a head the proxy
        # cannot forward as it came (never with media), or one aiohttp refuses: a clean 400.
        assert ours.status == 400, (head, ours, theirs)
        return
    assert ours.status == theirs.status, (head, ours, theirs)


@pytest.fixture
def watched(synapse: Synapse, proxy: MediaProxy, seeds: Seeds) -> Iterator[LogWatch]:
    before = outside_store(synapse, proxy)
    watch = LogWatch(proxy)
    yield watch
    settle_fills(synapse)
    assert outside_store(synapse, proxy) == before
    watch.events()


def test_fuzz_heads(synapse: Synapse, proxy: MediaProxy, seeds: Seeds, watched: LogWatch) -> None:
    examples: list[tuple[bytes, bytes]] = []

    @FUZZ
    @given(heads(seeds))
    def run(case: tuple[bytes, bytes]) -> None:
        examples.append(case)
        compare(proxy, synapse, *case)

    run()
    assert len(examples) >= FUZZ.max_examples


def test_fuzz_thumbnail_parameters(
    synapse: Synapse, proxy: MediaProxy, seeds: Seeds, watched: LogWatch
) -> None:
    """Well-formed heads, thumbnails of the seeded picture, the query as the only variable."""

    @FUZZ
    @given(
        st.sampled_from(["/_matrix/media/v3", "/_matrix/client/v1/media"]), queries(), st.booleans()
    )
    def run(api: str, query: bytes, evicted: bool) -> None:
        if evicted:
            evict_thumbnails(synapse, seeds.picture)
        target = f"{api}/thumbnail/{seeds.server_name}/{seeds.picture.media_id}?".encode() + query
        head = (
            b"GET "
            + target
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + seeds.token.encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        examples.append(head)
        compare(proxy, synapse, b"GET", head)

    examples: list[bytes] = []
    run()
    assert len(examples) >= FUZZ.max_examples


def evict_thumbnails(synapse: Synapse, media: Media) -> None:
    settle_fills(synapse)
    for path in (synapse.media_store_path / paths.local_thumbnail_dir(media.media_id)).glob("*"):
        path.unlink(missing_ok=True)


# The exact bytes behind each family the first differential run found; the proxy answered
# 200 with the file to all of the first group, and 500 to the absolute-form target.
def regression_heads(seeds: Seeds) -> list[bytes]:
    legacy = f"/_matrix/media/v3/download/{seeds.server_name}/{seeds.hit.media_id}".encode()
    thumb = f"/_matrix/media/v3/thumbnail/{seeds.server_name}/{seeds.picture.media_id}".encode()
    end = b"\r\nHost: x\r\nConnection: close\r\n\r\n"
    return [
        b"GET  " + legacy + b" HTTP/1.1" + end,
        b"GET " + legacy + b"  HTTP/1.1" + end,
        b"GET " + legacy + b" HTTP/2.0" + end,
        b"GET " + legacy + b"#x HTTP/1.1" + end,
        b"GET " + thumb + b"?width=32&height=32&method=crop&method=%FF HTTP/1.1" + end,
        b"GET " + thumb + b"?width=32&height=32&method=%FF&method=crop HTTP/1.1" + end,
        b"GET " + legacy + b"?access_token=%FF&access_token=%FE HTTP/1.1" + end,
        b"GET "
        + legacy
        + b" HTTP/1.1\r\nHost: x\r\nA: "
        + b"a" * 8000
        + b"\r\nB: "
        + b"b" * 8000
        + b"\r\nC: "
        + b"c" * 400
        + b"\r\nConnection: close\r\n\r\n",
        b"GET " + legacy + b"\x7f HTTP/1.1" + end,
        b"GET " + legacy + b"%00 HTTP/1.1" + end,
        b"GET " + legacy + b"\x80 HTTP/1.1" + end,
        b"GET http://x" + legacy + b" HTTP/1.1" + end,
        b"GET http://x/_matrix/client/versions HTTP/1.1" + end,
    ]


def test_regressions(synapse: Synapse, proxy: MediaProxy, seeds: Seeds, watched: LogWatch) -> None:
    for head in regression_heads(seeds):
        compare(proxy, synapse, head[: head.index(b" ")], head)
    # the absolute-form answer is Synapse's own 404 page, byte for byte
    absolute = regression_heads(seeds)[-2]
    ours, theirs = send(proxy.url, absolute), send(synapse.url, absolute)
    assert (ours.status, ours.body) == (theirs.status, theirs.body) == (404, theirs.body)
    refused = [e for e in watched.events() if e["event"] == "request.refused"]
    assert len(refused) >= 5, refused  # one event per refused head


# ---------------------------------------------------------------------------------------------
# As deployed: behind nginx


@pytest.fixture(scope="module")
def fronts(
    synapse: Synapse, proxy: MediaProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Nginx, Nginx]]:
    """The shipped nginx site twice: in front of media-proxy, as deployed, and with Synapse
    in media-proxy's place (the same front without the proxy)."""
    started = []
    try:
        for name, media in (("proxy", proxy.url), ("synapse", synapse.url)):
            server = Nginx(
                tmp_path_factory.mktemp(f"nginx-fuzz-{name}-{synapse.server_name}"),
                media_proxy=[media.removeprefix("http://")],
                synapse=synapse.url.removeprefix("http://"),
                server_name=synapse.server_name,
            )
            started.append(server)
            server.start()
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


def compare_fronted(fronts: tuple[Nginx, Nginx], method: bytes, head: bytes) -> None:
    """Through nginx (which refuses most odd heads itself and rewrites the request line)
    the answers are equal: status, and the body of a 200."""
    ours, theirs = (send(front.url, head, method=method) for front in fronts)
    assert CANARY not in ours.body and CANARY not in theirs.body, head
    if theirs.status == 502 and not head.split(b"\r\n")[0].isascii():
        # nginx passes bytes above 0x7F; Synapse drops such a request (nginx's 502)
        assert ours.status == 400, (head, ours, theirs)
        return
    assert ours.status == theirs.status, (head, ours, theirs)
    if ours.status == 200:
        assert ours.sha256 == theirs.sha256, (head, ours, theirs)


def test_fuzz_behind_nginx(fronts: tuple[Nginx, Nginx], seeds: Seeds, watched: LogWatch) -> None:
    for head in regression_heads(seeds):
        compare_fronted(fronts, head[: head.index(b" ")], head)
    examples: list[tuple[bytes, bytes]] = []

    @FUZZ
    @given(heads(seeds))
    def run(case: tuple[bytes, bytes]) -> None:
        examples.append(case)
        compare_fronted(fronts, *case)

    run()
    assert len(examples) >= FUZZ.max_examples


# ---------------------------------------------------------------------------------------------
# X-Accel headers from the upstream never reach nginx


class HostileUpstream:
    """A stand-in for Synapse that answers everything with X-Accel-* headers.

    Synapse never sends X-Accel-Redirect (and has no feature that echoes response headers),
    so no real Synapse can show what the proxy does with one. The component under test is
    the proxy's header filter; this upstream is a test fixture emitting a hostile header,
    not a model of Synapse's behaviour. Serves on loopback from a thread of the test process.
    """

    BODY = b'{"from":"upstream"}'

    def __init__(self, redirect: str) -> None:
        body = self.BODY

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Accel-Redirect", redirect)
                self.send_header("X-Accel-Buffering", "no")
                self.send_header("X-Accel-Limit-Rate", "1")
                self.send_header("X-Accel-Expires", "3600")
                self.send_header("X-Accel-Charset", "koi8-r")
                self.send_header("Connection", "close")  # an upload's body stays unread
                self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HostileUpstream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def test_x_accel_headers_from_synapse_are_dropped(
    synapse: Synapse,
    s3_proxy: FaultProxy,
    devstack_dir: Path,
    seeds: Seeds,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """nginx in X-Accel mode, media-proxy with --accel-redirect, and behind it an upstream
    whose every answer says `X-Accel-Redirect: <the internal location of a stored file>`.
    Pass-through answers on media routes (config, a download without a database row, an
    upload) must come back with the upstream's body and without any X-Accel-* header: had
    the header gone through, nginx would have sent the stored file instead."""
    secret = seeds.hit
    redirect = "/_media_proxy_cache/" + secret.rel
    with HostileUpstream(redirect) as upstream:
        media_proxy = MediaProxy(
            devstack_dir / f"media-proxy-hostile-{synapse.server_name}",
            synapse_config=synapse.config_path,
            synapse_url=upstream.url,
            config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
            extra_args=["--accel-redirect", "/_media_proxy_cache/"],
        ).start()
        nginx = Nginx(
            tmp_path_factory.mktemp(f"nginx-hostile-{synapse.server_name}"),
            media_proxy=[media_proxy.url.removeprefix("http://")],
            synapse=synapse.url.removeprefix("http://"),
            server_name=synapse.server_name,
            accel_root=synapse.media_store_path,
        )
        try:
            nginx.start()
            sn = synapse.server_name
            for method, path, body in [
                ("GET", "/_matrix/media/v3/config", None),
                ("GET", f"/_matrix/media/v3/download/{sn}/noSuchMediaIdHere", None),
                ("GET", f"/_matrix/media/r0/download/{sn}/noSuchMediaIdHere/x.txt", None),
                ("HEAD", f"/_matrix/media/v3/download/{sn}/noSuchMediaIdHere", None),
                ("POST", "/_matrix/media/v3/upload", b"data"),
            ]:
                direct = request(media_proxy.url, path, method=method, body=body)
                assert direct.status == 200, (path, direct)
                assert not [h for h, _ in direct.headers if h.startswith("x-accel-")], direct
                fronted = request(nginx.url, path, method=method, body=body)
                assert fronted.status == 200, (path, fronted)
                assert fronted.body == (b"" if method == "HEAD" else upstream.BODY), (path, fronted)
                assert secret.data not in fronted.body
                assert not [h for h, _ in fronted.headers if h.startswith("x-accel-")], fronted
        finally:
            nginx.stop()
            media_proxy.stop()
