"""nginx/media-proxy.conf for real: `nginx -t` on the rendered test config, then Debian's nginx
started on loopback in front of small Python upstreams (tests/deploy/conftest.py): two fake
media-proxy instances and one fake Synapse.

Checks the routing of the three media prefixes, the consistent hash (every request for one
file lands on one instance), what nginx passes upstream (raw path, Host, X-Forwarded-*,
keep-alive, unbuffered uploads), and X-Accel mode: a file served from a directory with exactly
the proxy's headers, nothing added by nginx, Range ignored.
"""

from __future__ import annotations

import collections
import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from deploy_helpers import (
    DOWNLOAD_HEADERS,
    THUMBNAIL_HEADERS,
    FakeUpstream,
    Nginx,
    fake_upstream,
    free_port,
    load_renderer,
    nginx_binary,
    run_nginx,
)

pytestmark = pytest.mark.integration

SERVER_NAME = "hs.test"
FILE_REL = "local_content/ab/cd/efghijklmnopqrstuvwx"
FILE_BODY = bytes(range(256)) * 41 + b"tail"  # 10500 bytes, not a multiple of any buffer
THUMB_REL = "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-png-crop"
THUMB_BODY = b"\x89PNG fake thumbnail"

# What nginx itself puts on every response; everything else must come from the upstream.
NGINX_OWN = {"server", "date", "connection", "content-length"}


@pytest.fixture(scope="module")
def renderer() -> ModuleType:
    return load_renderer()


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[FakeUpstream, FakeUpstream, FakeUpstream]]:
    with (
        fake_upstream("media-1") as m1,
        fake_upstream("media-2") as m2,
        fake_upstream("synapse") as syn,
    ):
        yield m1, m2, syn


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    for rel, body in ((FILE_REL, FILE_BODY), (THUMB_REL, THUMB_BODY)):
        path = root / rel
        path.parent.mkdir(parents=True)
        path.write_bytes(body)
    return root


@pytest.fixture(scope="module")
def nginx(
    renderer: ModuleType,
    upstreams: tuple[FakeUpstream, FakeUpstream, FakeUpstream],
    cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Nginx]:
    """X-Accel mode on (it changes nothing for requests the proxy does not redirect)."""
    m1, m2, syn = upstreams
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    renderer.render_test_config(
        prefix,
        listen=f"127.0.0.1:{port}",
        media_proxy=[m1.address, m2.address],
        synapse=syn.address,
        server_name=SERVER_NAME,
        accel_root=cache_dir,
    )
    with run_nginx(prefix, port) as running:
        yield running


@pytest.fixture(autouse=True)
def _fresh(upstreams: tuple[FakeUpstream, FakeUpstream, FakeUpstream]) -> None:
    for up in upstreams:
        up.reset()


def _headers(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = collections.defaultdict(list)
    for k, v in pairs:
        out[k.lower()].append(v)
    return dict(out)


def _upstream_view(pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The response headers minus those nginx always sets itself."""
    return {k: v for k, v in _headers(pairs).items() if k not in NGINX_OWN}


# ---------------------------------------------------------------------------------------------
# The config as files


@pytest.mark.parametrize(
    ("accel", "fast"),
    [(False, False), (True, False), (True, True)],
    ids=["default", "x-accel", "fast"],
)
def test_rendered_config_passes_nginx_t(
    renderer: ModuleType, tmp_path: Path, accel: bool, fast: bool
) -> None:
    conf = renderer.render_test_config(
        tmp_path / "prefix",
        listen=f"127.0.0.1:{free_port()}",
        media_proxy=["127.0.0.1:1", "127.0.0.1:2"],
        synapse="127.0.0.1:3",
        accel_root=tmp_path if accel else None,
        fast_hits=fast,
        client_max_body_size="100M",
    )
    site = (conf.parent / "media-proxy.conf").read_text()
    assert ("\n    include snippets/media-proxy-accel.conf;" in site) is accel
    assert ("\n    include snippets/media-proxy-fast-hits.conf;" in site) is fast
    assert ("\ninclude snippets/media-proxy-fast-hits-http.conf;" in site) is fast
    assert "client_max_body_size 100M;" in site
    result = subprocess.run(
        renderer.nginx_command(conf.parent.parent, nginx=nginx_binary(), test=True),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_production_config_differs_from_the_render_only_in_tagged_lines(
    renderer: ModuleType,
) -> None:
    source = renderer.SITE.read_text().splitlines()
    rendered = renderer.render_site(
        renderer.SITE.read_text(),
        listen="127.0.0.1:1",
        media_proxy=["127.0.0.1:2"],
        synapse="127.0.0.1:3",
        accel=True,
    ).splitlines()
    assert len(source) == len(rendered)
    changed = [(a, b) for a, b in zip(source, rendered, strict=True) if a != b]
    assert changed and all("# @" in a and "# @" in b for a, b in changed)
    # The shipped default: X-Accel off, one media-proxy, compose service names.
    text = renderer.SITE.read_text()
    assert "    # include snippets/media-proxy-accel.conf;  # @accel_include" in text
    assert "server media-proxy:8011;" in text
    assert "server synapse:8008;" in text


def test_renderer_refuses_a_config_missing_a_tag(renderer: ModuleType) -> None:
    text = renderer.SITE.read_text().replace("  # @synapse_servers", "")
    with pytest.raises(renderer.RenderError, match="synapse_servers"):
        renderer.render_site(text, listen="127.0.0.1:1", media_proxy=["a:1"], synapse="b:2")


def test_media_location_directives() -> None:
    """The streaming settings the brief asks for, in the media location."""
    text = (Path(__file__).resolve().parents[2] / "nginx" / "media-proxy.conf").read_text()
    media = text.split("location ~ ^/_matrix/(?:media|client/v1/media|federation/v1/media)/ {")[1]
    media = media.split("\n    }\n")[0]
    for directive in (
        "proxy_pass http://media_proxy;",
        "proxy_request_buffering off;",
        "proxy_buffering off;",
        "proxy_read_timeout 180s;",
    ):
        assert directive in media
    assert "hash $media_proxy_hash_key consistent;" in text
    assert "keepalive 32;" in text and "proxy_http_version 1.1;" in text


# ---------------------------------------------------------------------------------------------
# Routing


MEDIA_PATHS = [
    "/_matrix/media/v3/download/hs.test/abcdef",
    "/_matrix/media/r0/download/remote.org/abcdef/name.txt",
    "/_matrix/media/v1/thumbnail/hs.test/abcdef?width=32&height=32",
    "/_matrix/media/v3/upload?filename=x",
    "/_matrix/media/v3/config",
    "/_matrix/client/v1/media/download/hs.test/abcdef",
    "/_matrix/client/v1/media/thumbnail/hs.test/abcdef?width=1&height=1",
    "/_matrix/client/v1/media/preview_url?url=https://example.org",
    "/_matrix/federation/v1/media/download/abcdef",
    "/_matrix/federation/v1/media/thumbnail/abcdef?width=1&height=1",
]
SYNAPSE_PATHS = [
    "/_matrix/client/v3/sync",
    "/_matrix/client/versions",
    "/_matrix/client/v1/mediax/download/hs.test/abc",
    "/_matrix/mediafoo",
    "/_matrix/federation/v1/version",
    "/_synapse/admin/v1/media/hs.test/abc",
    "/health",
    "/",
]


@pytest.mark.parametrize("path", MEDIA_PATHS)
def test_media_prefixes_go_to_media_proxy(nginx: Nginx, path: str) -> None:
    answer = nginx.json(path)
    assert answer["upstream"] in ("media-1", "media-2")
    assert answer["path"] == path


@pytest.mark.parametrize("path", SYNAPSE_PATHS)
def test_everything_else_goes_to_synapse(nginx: Nginx, path: str) -> None:
    answer = nginx.json(path)
    assert answer["upstream"] == "synapse"
    assert answer["path"] == path


def test_raw_path_is_passed_unchanged(nginx: Nginx) -> None:
    """Synapse matches the still-encoded path: nginx must not decode or normalize it."""
    for path in (
        "/_matrix/client/v1/media/download/example.org%3A8448/abc/a%20b%2Fc.txt",
        "/_matrix/media/v3/download/hs.test/..%2F..%2Fetc",
        "/_matrix/client/v3/rooms/%21room%3Ahs.test/state",
    ):
        assert nginx.json(path)["path"] == path


def test_forwarded_headers(nginx: Nginx) -> None:
    for path in ("/_matrix/media/v3/config", "/_matrix/client/versions"):
        answer = nginx.json(
            path,
            headers={"Host": "matrix.hs.test", "X-Forwarded-For": "203.0.113.9"},
        )
        assert answer["host"] == "matrix.hs.test"
        # Set, not appended: a client cannot choose the address Synapse sees.
        assert answer["x_forwarded_for"] == "127.0.0.1"
        assert answer["x_forwarded_proto"] == "http"
        assert answer["x_request_id"]
        assert answer["connection"] is None  # HTTP/1.1 keep-alive, no "close"
        # A client's own request id is passed on (load tools and tests correlate with it).
        ours = nginx.json(path, headers={"X-Request-ID": "client-chosen-1"})
        assert ours["x_request_id"] == "client-chosen-1"


def test_keepalive_to_the_upstreams(nginx: Nginx, upstreams: tuple[FakeUpstream, ...]) -> None:
    """Sequential requests reuse one upstream connection (one nginx worker)."""
    m1, m2, syn = upstreams
    for _ in range(10):
        nginx.json("/_matrix/client/v1/media/download/hs.test/keepalive")
        nginx.json("/_matrix/client/versions")
    media = [s.peer_port for up in (m1, m2) for s in up.seen]
    assert len(media) == 10 and len(set(media)) == 1
    assert len(syn.seen) == 10 and len({s.peer_port for s in syn.seen}) == 1


def test_upload_streams_to_the_proxy_before_the_body_is_complete(
    nginx: Nginx, upstreams: tuple[FakeUpstream, ...]
) -> None:
    """proxy_request_buffering off: the proxy gets the request while the client still sends."""
    path = "/_matrix/media/v3/upload?filename=big.bin"
    first, second = b"a" * 1000, b"b" * 1000
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: hs.test\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(first) + len(second)}\r\nConnection: close\r\n\r\n".encode()
            + first
        )
        deadline = time.monotonic() + 5
        while not any(path in up.started for up in upstreams[:2]):
            assert time.monotonic() < deadline, "nginx held the upload back"
            time.sleep(0.02)
        sock.sendall(second)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert json.loads(body)["body_length"] == 2000


def test_upload_larger_than_max_upload_size_is_refused(nginx: Nginx) -> None:
    status, _, _ = nginx.request(
        "/_matrix/media/v3/upload",
        method="POST",
        body=b"x",
        headers={"Content-Length": str(50 * 1024 * 1024 + 1)},
    )
    assert status == 413


# ---------------------------------------------------------------------------------------------
# Consistent hashing


def _forms(server: str, media_id: str) -> list[str]:
    forms = [
        f"/_matrix/media/v3/download/{server}/{media_id}",
        f"/_matrix/media/r0/download/{server}/{media_id}/some%20name.png",
        f"/_matrix/media/v1/thumbnail/{server}/{media_id}?width=32&height=32",
        f"/_matrix/client/v1/media/download/{server}/{media_id}",
        f"/_matrix/client/v1/media/download/{server}/{media_id}/x.png",
        f"/_matrix/client/v1/media/thumbnail/{server}/{media_id}?width=96&height=96",
    ]
    if server == SERVER_NAME:  # federation requests are for this homeserver's media only
        forms += [
            f"/_matrix/federation/v1/media/download/{media_id}",
            f"/_matrix/federation/v1/media/thumbnail/{media_id}?width=32&height=32",
        ]
    return forms


def test_consistent_hash_keeps_each_file_on_one_instance(nginx: Nginx) -> None:
    owners: dict[str, set[str]] = collections.defaultdict(set)
    for n in range(40):
        server = SERVER_NAME if n % 2 else "remote.org"
        media_id = f"media{n:03d}xyzXYZ"
        for _ in range(3):
            for path in _forms(server, media_id):
                owners[f"{server}/{media_id}"].add(str(nginx.json(path)["upstream"]))
    assert all(len(o) == 1 for o in owners.values()), owners
    spread = collections.Counter(next(iter(o)) for o in owners.values())
    assert set(spread) == {"media-1", "media-2"}, spread


def test_percent_encoded_server_name_hashes_like_the_plain_one(nginx: Nginx) -> None:
    for n in range(10):
        plain = nginx.json(f"/_matrix/client/v1/media/download/hs.test:8448/p{n}")
        coded = nginx.json(f"/_matrix/client/v1/media/download/hs.test%3A8448/p{n}")
        assert plain["upstream"] == coded["upstream"]


def test_requests_without_a_media_id_are_spread(nginx: Nginx) -> None:
    """An empty hash key falls back to round robin (uploads, config, previews)."""
    seen = {str(nginx.json("/_matrix/media/v3/config")["upstream"]) for _ in range(10)}
    assert seen == {"media-1", "media-2"}


# ---------------------------------------------------------------------------------------------
# X-Accel mode


def _accel(nginx: Nginx, method: str = "GET", **headers: str) -> tuple[int, list, bytes]:
    return nginx.request(
        "/_matrix/client/v1/media/download/hs.test/efghijklmnopqrstuvwx",
        method=method,
        headers={"X-Test-Accel": FILE_REL, **headers},
    )


def test_accel_serves_the_file_with_exactly_the_proxy_headers(nginx: Nginx) -> None:
    status, headers, body = _accel(nginx)
    assert status == 200
    assert body == FILE_BODY
    assert _headers(headers)["content-length"] == [str(len(FILE_BODY))]
    assert _upstream_view(headers) == _headers(DOWNLOAD_HEADERS)
    for absent in ("last-modified", "accept-ranges", "x-accel-redirect", "content-range"):
        assert absent not in _headers(headers)


def test_accel_thumbnail_gets_no_headers_the_proxy_did_not_send(nginx: Nginx) -> None:
    status, headers, body = nginx.request(
        "/_matrix/client/v1/media/thumbnail/hs.test/efghijklmnopqrstuvwx?width=32&height=32",
        headers={"X-Test-Accel": THUMB_REL, "X-Test-Kind": "thumbnail"},
    )
    assert (status, body) == (200, THUMB_BODY)
    assert _upstream_view(headers) == _headers(THUMBNAIL_HEADERS)


@pytest.mark.parametrize(
    "header",
    [
        ("Range", "bytes=0-9"),
        ("Range", "bytes=100-"),
        ("If-Range", "1"),
        ("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT"),
        ("If-None-Match", "1"),  # media-proxy answers the 304 itself, before redirecting
        ("If-None-Match", '"1"'),
    ],
)
def test_accel_ignores_range_and_conditionals(nginx: Nginx, header: tuple[str, str]) -> None:
    status, headers, body = _accel(nginx, **{header[0]: header[1]})
    assert status == 200
    assert body == FILE_BODY
    assert _upstream_view(headers) == _headers(DOWNLOAD_HEADERS)


def test_accel_head(nginx: Nginx) -> None:
    status, headers, body = _accel(nginx, method="HEAD")
    assert (status, body) == (200, b"")
    assert _headers(headers)["content-length"] == [str(len(FILE_BODY))]
    assert _upstream_view(headers) == _headers(DOWNLOAD_HEADERS)


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (("If-Match", "1"), 412),
        (("If-Unmodified-Since", "Sat, 01 Jan 2000 00:00:00 GMT"), 412),
        (("If-None-Match", "*"), 304),
    ],
)
def test_accel_conditionals_nginx_still_answers(
    nginx: Nginx, header: tuple[str, str], status: int
) -> None:
    """Known limit (nginx/README.md): nginx evaluates these against the file before any
    add_header, and no directive turns that off. Synapse ignores them (200). media-proxy must
    stream such requests itself instead of redirecting them."""
    got, _, _ = _accel(nginx, **{header[0]: header[1]})
    assert got == status


def test_accel_location_is_internal(nginx: Nginx, upstreams: tuple[FakeUpstream, ...]) -> None:
    status, _, body = nginx.request("/_media_proxy_cache/" + FILE_REL)
    assert status == 404
    assert FILE_BODY not in body
    assert not any(up.seen for up in upstreams)


def test_accel_retries_through_the_proxy_when_the_file_is_gone(
    nginx: Nginx, upstreams: tuple[FakeUpstream, ...]
) -> None:
    path = "/_matrix/client/v1/media/download/hs.test/evictedevictedevicted/x.txt"
    status, headers, body = nginx.request(
        path, headers={"X-Test-Accel": "local_content/ev/ic/tedevicted", "X-Test-Accel-Once": "1"}
    )
    assert (status, body) == (200, b"from-s3")
    assert _upstream_view(headers) == _headers(DOWNLOAD_HEADERS)
    seen = [s for up in upstreams[:2] for s in up.seen]
    assert [(s.method, s.path) for s in seen] == [("GET", path), ("GET", path)]


def test_synapse_cannot_make_nginx_serve_files(nginx: Nginx) -> None:
    """The fake Synapse answers with X-Accel-Redirect: nginx passes its (empty) body on."""
    status, headers, body = nginx.request(
        "/_matrix/client/versions", headers={"X-Test-Accel": FILE_REL}
    )
    assert (status, body) == (200, b"")
    assert "x-accel-redirect" not in _headers(headers)


# ---------------------------------------------------------------------------------------------
# Fast-hit mode


def test_fast_mode_needs_x_accel_mode(renderer: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(renderer.RenderError, match="X-Accel"):
        renderer.render_test_config(
            tmp_path,
            listen="127.0.0.1:1",
            media_proxy=["127.0.0.1:2"],
            synapse="127.0.0.1:3",
            fast_hits=True,
        )


def test_fast_mode_asks_the_instance_that_holds_the_file(
    renderer: ModuleType,
    upstreams: tuple[FakeUpstream, FakeUpstream, FakeUpstream],
    cache_dir: Path,
    tmp_path: Path,
) -> None:
    """The question (a subrequest to /_media_proxy_decide) is hashed like the request it is
    about, so it reaches the instance whose cache holds the file; a no (here: any answer
    without X-Accel-Redirect) sends the request itself to that same instance, without the
    client's own X-Media-Proxy-Decide."""
    m1, m2, syn = upstreams
    port = free_port()
    renderer.render_test_config(
        tmp_path / "prefix",
        listen=f"127.0.0.1:{port}",
        media_proxy=[m1.address, m2.address],
        synapse=syn.address,
        server_name=SERVER_NAME,
        accel_root=cache_dir,
        fast_hits=True,
    )
    owners = collections.Counter[str]()
    with run_nginx(tmp_path / "prefix", port) as nginx:
        for n in range(30):
            path = f"/_matrix/client/v1/media/download/{SERVER_NAME}/fast{n:03d}xyzXYZ"
            answer = nginx.json(path, headers={"X-Media-Proxy-Decide": "1"})
            asked = [
                (up.name, s.headers.get("X-Media-Proxy-Decide"))
                for up in (m1, m2)
                for s in list(up.seen)
                if s.path == path and "X-Media-Proxy-Decide" in s.headers
            ]
            assert asked == [(answer["upstream"], "1")], (path, asked, answer)
            owners[str(answer["upstream"])] += 1
            ranged = nginx.json(path, headers={"Range": "bytes=0-1"})
            assert ranged["upstream"] == answer["upstream"]
            told = [
                s.headers.get("X-Media-Proxy-Decide")
                for up in (m1, m2)
                for s in list(up.seen)
                if s.path == path and "X-Media-Proxy-Decide" in s.headers
            ]
            assert told == ["1", "conditional"]  # Range: the proxy is told, and says no
    assert set(owners) == {"media-1", "media-2"}, owners
