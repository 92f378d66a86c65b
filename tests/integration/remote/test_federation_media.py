"""Federation media downloads (`/_matrix/federation/v1/media/download/{id}`) answered by the
proxy in front of homeserver A: differential against A itself (SQLite and PostgreSQL), with
the file in A's store and evicted from it; and the real path, B fetching A's media through
the proxy (``test_origin_fetches_through_the_proxy``).

Real parts: Synapse B (``origin``) and Synapse A (``home``, S3 provider) federating over
loopback, media-proxy in front of A, SeaweedFS behind the fault proxy that counts S3 GETs.
A learns B's signing key the real way: B downloads one of A's media over federation (A
fetches B's key from B and stores it in ``server_keys_json``). The test then signs its own
requests with B's signing key (read from B's config directory), as B's Synapse would: B
itself talks to A's federation listener directly, not through the proxy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import signedjson.key
import signedjson.sign
from signedjson.types import SigningKey

from devstack.nginx import nginx_binary
from devstack.procs import LOOPBACK, ManagedProcess, free_port
from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths
from tests.conftest import PASSWORD
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import (
    Answer,
    Media,
    bearer,
    evict,
    request,
    settle_fills,
    sql,
    stored_bytes,
    upload,
)
from tests.integration.test_serving import s3_gets, wait_for

PREFIX = "/_matrix/federation/v1/media/download/"
_BOUNDARY = re.compile(rb"[0-9a-f]{32}")
_NOW = re.compile(rb"minimum_valid_until_ts=\d+")


def x_matrix(
    key: SigningKey,
    origin: str,
    destination: str,
    method: str,
    uri: str,
    *,
    key_id: str | None = None,
    with_destination: bool = True,
) -> str:
    """The Authorization header Synapse's federation client sends for this request."""
    signed = signedjson.sign.sign_json(
        {"method": method, "uri": uri, "origin": origin, "destination": destination},
        origin,
        key,
    )
    real_id = f"{key.alg}:{key.version}"
    sig = signed["signatures"][origin][real_id]
    header = f'X-Matrix origin="{origin}",key="{key_id or real_id}",sig="{sig}"'
    return header + (f',destination="{destination}"' if with_destination else "")


def comparable(answer: Answer) -> Any:
    """Status, headers and body with the (random, per response) boundary normalized."""
    boundary = ""
    ctype = answer.header("content-type") or ""
    if "boundary=" in ctype:
        boundary = ctype.split("boundary=", 1)[1]
        assert _BOUNDARY.fullmatch(boundary.encode()), ctype
    body = answer.body.replace(boundary.encode(), b"B") if boundary else answer.body
    body = _NOW.sub(b"minimum_valid_until_ts=NOW", body)  # Synapse's clock in its 401
    headers = sorted(
        (k, v.replace(boundary, "B") if boundary else v)
        for k, v in answer.headers
        if k not in ("server", "date")
    )
    return answer.status, headers, body, answer.complete


def file_part(answer: Answer) -> bytes:
    """The file bytes of a multipart answer (between the file part's headers and the end)."""
    boundary = (answer.header("content-type") or "").split("boundary=", 1)[1].encode()
    parts = answer.body.split(b"\r\n--" + boundary)
    assert parts[0] == b"" and parts[-1] == b"--\r\n", answer.body[:200]
    assert parts[1] == b"\r\nContent-Type: application/json\r\n\r\n{}"
    return parts[2].split(b"\r\n\r\n", 1)[1]


@pytest.fixture(scope="module")
def origin_key(origin: Synapse) -> SigningKey:
    """B's signing key, from the file Synapse generated in B's config directory."""
    path = origin.config["signing_key_path"]
    with open(path) as f:
        keys: list[SigningKey] = signedjson.key.read_signing_keys(f)
    return keys[0]


@pytest.fixture(scope="module")
def local(home: Synapse, home_token: str) -> dict[str, Media]:
    def up(data: bytes, content_type: str, name: str | None) -> Media:
        return upload(
            home.url, home_token, data, content_type=content_type, name=name,
            server_name=home.server_name,
        )  # fmt: skip

    return {
        "png": up(png(320, 240, 3), "image/png", "cat.png"),
        "svg": up(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "\u00e9t\u00e9.svg"),  # noqa: E501
        "text": up(b"hello " * 1000, "TEXT/PLAIN", None),
        "params": up(b"a,b\n" * 100, 'text/csv; x="y"', "a b/c.csv"),
        "big": up(os.urandom(3 * 1024 * 1024 + 5), "video/mp4", "clip.mp4"),
    }  # fmt: skip


@pytest.fixture(scope="module")
def key_known(home: Synapse, origin: Synapse, origin_token: str, local: dict[str, Media]) -> None:
    """B fetches A's media over federation: A verifies B's request and stores B's key."""
    media = local["text"]
    answer = request(origin.url, media.client_path(), headers=bearer(origin_token))
    assert answer.status == 200 and answer.body == media.data, answer
    rows = sql(
        home,
        "SELECT key_id FROM server_keys_json WHERE server_name = ?",
        origin.server_name,
    )
    assert rows, "A did not store B's key"


def signed(
    home: Synapse, origin: Synapse, key: SigningKey, method: str, uri: str
) -> list[tuple[str, str]]:
    return [("Authorization", x_matrix(key, origin.server_name, home.server_name, method, uri))]


def sources(proxy: MediaProxy, media_id: str) -> list[str]:
    return [
        e["source"]
        for e in proxy.log_events()
        if e.get("event") == "request"
        and e.get("route") == "federation-download"
        and e.get("media_id") == media_id
    ]


def differential(
    home: Synapse,
    proxy: MediaProxy,
    method: str,
    uri: str,
    headers: list[tuple[str, str]],
    before_proxy: Any = None,
) -> tuple[Answer, Answer]:
    if before_proxy:
        before_proxy()
    ours = request(proxy.url, uri, method=method, headers=headers)
    if before_proxy:
        before_proxy()
    theirs = request(home.url, uri, method=method, headers=headers)
    assert comparable(ours) == comparable(theirs), (method, uri, headers, ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("evicted", [False, True], ids=["in-store", "evicted"])
@pytest.mark.parametrize("kind", ["png", "svg", "text", "params", "big"])
def test_federation_downloads_match_synapse(
    home: Synapse,
    origin: Synapse,
    home_proxy: MediaProxy,
    origin_key: SigningKey,
    key_known: None,
    local: dict[str, Media],
    s3_faults: FaultProxy,
    kind: str,
    evicted: bool,
) -> None:
    media = local[kind]
    base = PREFIX + media.media_id
    forms = [
        ("GET", base + "?timeout_ms=20000", []),  # what Synapse sends
        ("GET", base, []),
        ("HEAD", base, []),
        ("GET", base, [("If-None-Match", "1")]),
    ]
    for method, uri, extra in forms:
        headers = [*signed(home, origin, origin_key, method, uri), *extra]
        if evicted:
            settle_fills(home)
            s3_faults.reset()
        ours, _ = differential(
            home, home_proxy, method, uri, headers,
            before_proxy=(lambda: evict(home, media)) if evicted else None,
        )  # fmt: skip
        if method == "GET" and not extra:
            assert ours.status == 200 and file_part(ours) == media.data
            if evicted:
                assert s3_gets(s3_faults, media) == 1  # the proxy's fill (Synapse: a miss)
    expected = ["s3", "s3", "s3", "proxy"] if evicted else ["cache", "cache", "cache", "proxy"]
    assert wait_for(lambda: sources(home_proxy, media.media_id)[-4:] == expected)
    # Evicted, then asked by the proxy only: one S3 GET, and the file is back in A's store.
    evict(home, media)
    s3_faults.reset()
    uri = base + "?timeout_ms=20000"
    answer = request(home_proxy.url, uri, headers=signed(home, origin, origin_key, "GET", uri))
    assert answer.status == 200 and file_part(answer) == media.data
    assert stored_bytes(home, media) == media.data
    assert s3_gets(s3_faults, media) == 1


def test_federation_refusals_and_pass_throughs_match_synapse(
    home: Synapse,
    origin: Synapse,
    home_proxy: MediaProxy,
    origin_key: SigningKey,
    key_known: None,
    local: dict[str, Media],
) -> None:
    media = local["png"]
    uri = PREFIX + media.media_id
    me, other = origin.server_name, home.server_name

    def auth(value: str) -> list[tuple[str, str]]:
        return [("Authorization", value)]

    good = x_matrix(origin_key, me, other, "GET", uri)
    sig = re.search(r'sig="([^"]*)"', good)
    assert sig is not None
    forged = good.replace(sig[1], ("A" if sig[1][0] != "A" else "B") + sig[1][1:])
    answered = [  # refusals the proxy knows byte for byte
        [],
        bearer("not-a-token"),
        auth(f'X-Matrix origin="bad_name",key="ed25519:a",sig="{sig[1]}"'),
        auth("X-Matrix"),
        auth(good.replace(f'destination="{other}"', 'destination="elsewhere.org"')),
        auth(f'X-Matrix origin="{me}",key="rsa:1",sig="{sig[1]}"'),
    ]
    passed = [  # Synapse's own answers
        auth(forged),  # 401 with PyNaCl's message
        auth(x_matrix(origin_key, me, other, "GET", uri, key_id="ed25519:unknown")),  # fetched
        auth(x_matrix(origin_key, me, other, "GET", uri + "?x=1")),  # signed another target
        auth(x_matrix(origin_key, me, other, "HEAD", uri)),  # signed another method
        auth(x_matrix(origin_key, me, other, "GET", PREFIX + "nosuchmedia")),
    ]
    for headers in answered + passed:
        ours, _ = differential(home, home_proxy, "GET", uri, headers)
        assert ours.status in (400, 401), ours
    unknown = PREFIX + "nosuchmedia"
    ours, _ = differential(
        home, home_proxy, "GET", unknown, signed(home, origin, origin_key, "GET", unknown)
    )
    assert ours.status == 404
    events = [
        e
        for e in home_proxy.log_events()
        if e.get("event") == "request" and e.get("route") == "federation-download"
    ]
    got = [e["source"] for e in events][-(len(answered) + len(passed) + 1) :]
    assert got == ["proxy"] * len(answered) + ["synapse"] * (len(passed) + 1)
    # Without the destination parameter the request is still accepted (and signed for us).
    no_dest = auth(x_matrix(origin_key, me, other, "GET", uri, with_destination=False))
    ours, _ = differential(home, home_proxy, "GET", uri, no_dest)
    assert ours.status == 200 and file_part(ours) == media.data
    assert json.loads(request(home_proxy.url, uri, headers=auth("X-Matrix")).body) == {
        "errcode": "M_UNAUTHORIZED",
        "error": "Malformed Authorization header",
    }


def test_escaped_target_is_verified_raw(
    home: Synapse,
    origin: Synapse,
    home_proxy: MediaProxy,
    origin_key: SigningKey,
    key_known: None,
    local: dict[str, Media],
) -> None:
    """The signed `uri` is the request target as sent: an escaped letter is signed escaped."""
    media = local["png"]
    first = media.media_id[0]
    escaped = PREFIX + f"%{ord(first):02X}" + media.media_id[1:]
    headers = signed(home, origin, origin_key, "GET", escaped)
    ours, _ = differential(home, home_proxy, "GET", escaped, headers)
    assert ours.status == 200 and file_part(ours) == media.data
    assert sources(home_proxy, media.media_id)[-1] in ("cache", "s3")


_TLS_FRONT = """
worker_processes 1;
error_log logs/error.log;
pid logs/nginx.pid;
events {{ worker_connections 64; }}
http {{
    access_log logs/access.log;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {{
        listen {listen} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        proxy_http_version 1.1;
        proxy_set_header Host $http_host;
        proxy_buffering off;
        # no proxy_pass URI: the request line (and so the signed target) goes unchanged
        location ~ ^/_matrix/federation/v1/media/ {{ proxy_pass http://{proxy}; }}
        location / {{ proxy_pass http://{synapse}; }}
    }}
}}
"""


@pytest.fixture(scope="module")
def fronted(
    devstack_dir: Path, seaweed: SeaweedFS, origin: Synapse, s3_proxy: FaultProxy
) -> Iterator[tuple[Synapse, MediaProxy]]:
    """A homeserver whose federation port is a TLS nginx sending federation media to the
    proxy and the rest to Synapse's plain listener: B reaches A's media through the proxy."""
    port = free_port()
    plain = {
        "port": port,
        "bind_addresses": [LOOPBACK],
        "type": "http",
        "tls": False,
        "x_forwarded": True,
        "resources": [{"names": ["client", "federation"], "compress": False}],
    }
    home = Synapse(
        devstack_dir / "synapse-fronted",
        s3=seaweed.create_bucket("fronted"),
        federation=True,
        port=port,
        extra_config={"listeners": [plain]},  # the TLS port is nginx's
    ).start()
    proxy: MediaProxy | None = None
    front: ManagedProcess | None = None
    try:
        proxy = MediaProxy(
            devstack_dir / "media-proxy-fronted",
            synapse_config=home.config_path,
            synapse_url=home.url,
            config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
        ).start()
        prefix = devstack_dir / "nginx-fronted"
        for sub in ("conf", "logs", "tmp"):
            (prefix / sub).mkdir(parents=True, exist_ok=True)
        assert home.federation_port is not None
        (prefix / "conf" / "nginx.conf").write_text(
            _TLS_FRONT.format(
                listen=f"{LOOPBACK}:{home.federation_port}",
                cert=home.workdir / "tls.crt",
                key=home.workdir / "tls.key",
                proxy=f"{LOOPBACK}:{proxy.port}",
                synapse=f"{LOOPBACK}:{port}",
            )
        )
        directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
        front = ManagedProcess(
            "nginx (TLS front)",
            [nginx_binary(), "-p", f"{prefix}/", "-c", str(prefix / "conf" / "nginx.conf"),
             "-g", directives],
            log_path=prefix / "logs" / "nginx.out",
        )  # fmt: skip
        front.wait_for_port(home.federation_port, timeout=15)
        yield home, proxy
    finally:
        if front is not None:
            front.stop()
        if proxy is not None:
            proxy.stop()
        home.stop()


def test_origin_fetches_through_the_proxy(
    fronted: tuple[Synapse, MediaProxy],
    origin: Synapse,
    origin_token: str,
    s3_faults: FaultProxy,
) -> None:
    """B downloads A's media with its own federation client: the first request carries a key
    A has not stored yet (passed to A, which fetches and stores it), then the proxy answers:
    an evicted file from S3 (one GET, put back), a stored one from the store."""
    home, proxy = fronted
    token = home.register_user("frank", PASSWORD)

    def up(data: bytes, content_type: str, name: str) -> Media:
        return upload(
            home.url, token, data, content_type=content_type, name=name,
            server_name=home.server_name,
        )  # fmt: skip

    first = up(b"first " * 100, "text/plain", "first.txt")
    evicted = up(os.urandom(2 * 1024 * 1024 + 3), "video/mp4", "clip.mp4")
    stored = up(png(64, 48, 5), "image/png", "cat.png")
    evict(home, evicted)
    s3_faults.reset()
    for media in (first, evicted, stored):
        answer = request(origin.url, media.client_path(), headers=bearer(origin_token))
        assert answer.status == 200 and answer.body == media.data, answer
        assert (answer.header("content-type") or "").startswith(media.content_type)
        assert media.name is not None and media.name in (answer.header("content-disposition") or "")
    assert s3_gets(s3_faults, evicted) == 1
    assert stored_bytes(home, evicted) == evicted.data
    assert wait_for(
        lambda: (
            [sources(proxy, m.media_id) for m in (first, evicted, stored)]
            == [["synapse"], ["s3"], ["cache"]]
        )
    )


def evict_thumbnails(home: Synapse, media: Media) -> None:
    settle_fills(home)
    shutil.rmtree(home.media_store_path / paths.local_thumbnail_dir(media.media_id), True)


@pytest.mark.parametrize("evicted", [False, True], ids=["in-store", "evicted"])
def test_federation_thumbnails_match_synapse(
    home: Synapse,
    origin: Synapse,
    home_proxy: MediaProxy,
    origin_key: SigningKey,
    key_known: None,
    local: dict[str, Media],
    evicted: bool,
) -> None:
    media = local["png"]
    base = "/_matrix/federation/v1/media/thumbnail/" + media.media_id
    forms = [
        ("GET", "?width=32&height=32&method=crop"),
        ("GET", "?width=96&height=96&method=crop&timeout_ms=20000"),
        ("GET", "?width=300&height=200"),
        ("HEAD", "?width=320&height=240&method=scale"),
        ("GET", "?width=32&height=32&animated=true"),
        ("GET", "?width=0&height=0"),
        ("GET", "?width=32"),  # 400 M_MISSING_PARAM, after authentication: Synapse's
    ]
    for method, query in forms:
        uri = base + query
        ours, _ = differential(
            home, home_proxy, method, uri, signed(home, origin, origin_key, method, uri),
            before_proxy=(lambda: evict_thumbnails(home, media)) if evicted else None,
        )  # fmt: skip
        if query != "?width=32":
            assert ours.status == 200, ours
    expected = "s3" if evicted else "cache"
    got = [
        e["source"]
        for e in home_proxy.log_events()
        if e.get("event") == "request"
        and e.get("route") == "federation-thumbnail"
        and e.get("media_id") == media.media_id
    ][-(len(forms) - 1) :]
    assert got == [expected] * (len(forms) - 1)  # the last form never reaches a pipeline
