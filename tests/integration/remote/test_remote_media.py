"""Remote media (cached by homeserver A from homeserver B over real federation), served by the
proxy in front of A: differential against A (SQLite and PostgreSQL) with the files in A's
store and evicted from it, refills from S3, quarantine, access times.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from typing import Any

import pytest

from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.synapse import Synapse
from media_proxy import paths
from tests.conftest import PASSWORD
from tests.faults import FaultProxy
from tests.integration.media import (
    Media,
    bearer,
    complete_file,
    folder_bytes,
    request,
    settle_fills,
    sql,
    upload,
)
from tests.integration.test_serving import cases, differential, wait_for

TTL = float(0.5 + 0.2)  # TEST_PROXY_CONFIG's metadata_cache_ttl, and a margin


def remote_row(home: Synapse, media: Media) -> tuple[str, int]:
    """(filesystem_id, media_length) of A's cached copy."""
    rows = sql(
        home,
        "SELECT filesystem_id, media_length FROM remote_media_cache"
        " WHERE media_origin = ? AND media_id = ?",
        media.server_name,
        media.media_id,
    )
    assert rows, f"{media.media_id} not cached by {home.server_name}"
    return str(rows[0][0]), int(rows[0][1])


def remote_rel(home: Synapse, media: Media) -> str:
    return paths.remote_media(media.server_name, remote_row(home, media)[0])


def thumbnail_dir(home: Synapse, media: Media) -> str:
    return paths.remote_thumbnail_dir(media.server_name, remote_row(home, media)[0])


def evict_remote(home: Synapse, media: Media, *, thumbnails: bool = False) -> None:
    settle_fills(home)
    (home.media_store_path / remote_rel(home, media)).unlink(missing_ok=True)
    if thumbnails:
        shutil.rmtree(home.media_store_path / thumbnail_dir(home, media), ignore_errors=True)


def s3_gets(faults: FaultProxy, rel: str) -> int:
    return sum(
        1
        for m, p in faults.requests
        if m == "GET" and urllib.parse.unquote(p.split("?")[0]).endswith(rel)
    )


def request_events(proxy: MediaProxy) -> list[dict[str, Any]]:
    """The proxy's request log so far (complete lines only: one may be being written)."""
    text = proxy.log_path.read_text()
    lines = text[: text.rfind("\n") + 1].splitlines()
    events = [json.loads(line) for line in lines if line.startswith("{")]
    return [e for e in events if e.get("event") == "request"]


def sources(proxy: MediaProxy, media_id: str) -> list[str]:
    """The `source` of each request for `media_id` in the proxy's request log, in order."""
    return [e["source"] for e in request_events(proxy) if e.get("media_id") == media_id]


def source_of(proxy: MediaProxy, request_id: str) -> str:
    """The `source` of the request sent with `X-Request-ID: request_id`, once it is logged
    (the log line is written after the response)."""
    found = wait_for(
        lambda: [e["source"] for e in request_events(proxy) if e["request_id"] == request_id]
    )
    assert found, f"no request {request_id} in {proxy.log_path}"
    return str(found[0])


def fetch_through_home(home: Synapse, token: str, media: Media) -> None:
    """A fetches the media from B over federation, caches it, and (store_remote) puts it in S3."""
    answer = request(home.url, media.client_path(), headers=bearer(token))
    assert answer.status == 200, (answer.status, answer.body[:300])
    assert answer.body == media.data


@pytest.fixture(scope="module")
def other_token(home: Synapse) -> str:
    return home.register_user("erin", PASSWORD)


@pytest.fixture(scope="module")
def remote(home: Synapse, origin: Synapse, origin_token: str, home_token: str) -> dict[str, Media]:
    """Media uploaded on B, each fetched once by A."""

    def up(data: bytes, content_type: str, name: str | None) -> Media:
        return upload(
            origin.url,
            origin_token,
            data,
            content_type=content_type,
            name=name,
            server_name=origin.server_name,
        )

    media = {
        "png": up(png(640, 480, 7), "image/png", "cat.png"),
        "html": up(b"<script>alert(1)</script>" * 100, "text/html", "page.html"),
        "svg": up(
            b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "\u00e9t\u00e9.svg"
        ),
        "text": up(b"hello " * 1000, "TEXT/PLAIN", None),
        "params": up(b"a,b\n" * 100, "text/csv; charset=latin1", "a b/c.csv"),
        "big": up(os.urandom(3 * 1024 * 1024 + 5), "video/mp4", "clip.mp4"),
        "legacy_ok": up(os.urandom(5000), "image/jpeg", "old.jpg"),
        "quarantined": up(os.urandom(6000), "image/gif", "q.gif"),
    }
    for item in media.values():
        fetch_through_home(home, home_token, item)
    # A row cached before authenticated media: servable on the legacy routes too.
    sql(
        home,
        "UPDATE remote_media_cache SET authenticated = ? WHERE media_origin = ? AND media_id = ?",
        False,
        origin.server_name,
        media["legacy_ok"].media_id,
    )
    return media


@pytest.fixture(scope="module")
def quarantined(home: Synapse, home_admin_token: str, remote: dict[str, Media]) -> Media:
    media = remote["quarantined"]
    answer = request(
        home.url,
        f"/_synapse/admin/v1/media/quarantine/{media.server_name}/{media.media_id}",
        method="POST",
        headers=[*bearer(home_admin_token), ("Content-Type", "application/json")],
        body=b"{}",
    )
    assert answer.status == 200, answer.body
    time.sleep(TTL)  # the quarantine reaches the proxy within the TTL
    return media


def remote_cases(
    media: Media, token: str, other: str
) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The local download forms plus the remote-only `allow_remote` parameter."""
    return [
        *cases(media, token, other),
        ("GET", media.legacy_path("v3", "?allow_remote=false"), []),
        ("GET", media.legacy_path("r0", "/n.bin?allow_remote=true"), []),
        ("GET", media.legacy_path("v3", "?allow_remote=maybe"), []),
        ("GET", media.client_path("?allow_remote=false"), bearer(token)),
        ("HEAD", media.legacy_path("v1", "?allow_remote=false"), []),
    ]


@pytest.mark.parametrize("evicted", [False, True], ids=["in-store", "evicted"])
@pytest.mark.parametrize("kind", ["png", "html", "svg", "text", "params", "big", "legacy_ok"])
def test_remote_downloads_match_synapse(
    home: Synapse,
    home_proxy: MediaProxy,
    home_token: str,
    other_token: str,
    remote: dict[str, Media],
    kind: str,
    evicted: bool,
) -> None:
    media = remote[kind]
    for method, path, headers in remote_cases(media, home_token, other_token):
        differential(
            home,
            home_proxy,
            method,
            path,
            headers,
            before_proxy=(lambda: evict_remote(home, media)) if evicted else None,
        )
    evict_remote(home, media)
    answer = request(home_proxy.url, media.client_path(), headers=bearer(home_token))
    assert answer.body == media.data
    stored = complete_file(home.media_store_path / remote_rel(home, media), len(media.data))
    assert stored == media.data


def test_evicted_remote_file_is_served_and_put_back_by_the_proxy(
    home: Synapse,
    home_proxy: MediaProxy,
    home_token: str,
    remote: dict[str, Media],
    s3_faults: FaultProxy,
) -> None:
    media = remote["big"]
    rel = remote_rel(home, media)
    evict_remote(home, media)
    s3_faults.reset()
    first = request(home_proxy.url, media.client_path(), headers=bearer(home_token))
    # the fill renames its file into place just after the verified last byte
    assert complete_file(home.media_store_path / rel, len(media.data)) == media.data
    second = request(home_proxy.url, media.client_path(), headers=bearer(home_token))
    assert first.status == second.status == 200
    assert first.body == second.body == media.data
    assert s3_gets(s3_faults, rel) == 1  # the second was a hit
    events = wait_for(
        lambda: (
            [
                e["source"]
                for e in home_proxy.log_events()
                if e.get("event") == "request" and e.get("media_id") == media.media_id
            ][-2:]
            == ["s3", "cache"]
        )
    )
    assert events


def test_quarantined_remote_media_is_404_without_s3(
    home: Synapse,
    home_proxy: MediaProxy,
    home_token: str,
    quarantined: Media,
    s3_faults: FaultProxy,
) -> None:
    evict_remote(home, quarantined)
    s3_faults.reset()
    for method, path, headers in [
        ("GET", quarantined.client_path(), bearer(home_token)),
        ("HEAD", quarantined.client_path(), bearer(home_token)),
        ("GET", quarantined.legacy_path(), []),
        ("GET", quarantined.client_path(), [*bearer(home_token), ("If-None-Match", "1")]),
        ("GET", thumb_path(quarantined, "client", "width=32&height=32"), bearer(home_token)),
        ("GET", thumb_path(quarantined, "legacy", "width=32&height=32"), []),
    ]:
        ours, _ = differential(home, home_proxy, method, path, headers)
        assert ours.status == 404
    ours = request(home_proxy.url, quarantined.client_path(), headers=bearer(home_token))
    assert json.loads(ours.body) == {"errcode": "M_NOT_FOUND", "error": "Not found"}
    assert s3_gets(s3_faults, remote_rel(home, quarantined)) == 0
    assert not (home.media_store_path / remote_rel(home, quarantined)).exists()


def test_unknown_remote_media_passes_through(
    home: Synapse, home_proxy: MediaProxy, home_token: str, origin: Synapse
) -> None:
    for path, headers in [
        (
            f"/_matrix/client/v1/media/download/{origin.server_name}/NoSuchMediaHere",
            bearer(home_token),
        ),
        (f"/_matrix/media/v3/download/{origin.server_name}/NoSuchMediaHere", []),
        (
            f"/_matrix/client/v1/media/thumbnail/{origin.server_name}/NoSuch?width=32&height=32",
            bearer(home_token),
        ),
    ]:
        ours, _ = differential(home, home_proxy, "GET", path, headers)
        assert ours.status == 404
    seen = sources(home_proxy, "NoSuchMediaHere") + sources(home_proxy, "NoSuch")
    assert seen and set(seen) == {"synapse"}


def test_remote_last_access_ts_is_written(
    home: Synapse, home_proxy: MediaProxy, remote: dict[str, Media]
) -> None:
    media = remote["legacy_ok"]
    select = "SELECT last_access_ts FROM remote_media_cache WHERE media_origin = ? AND media_id = ?"
    sql(
        home,
        "UPDATE remote_media_cache SET last_access_ts = ? WHERE media_origin = ? AND media_id = ?",
        1,
        media.server_name,
        media.media_id,
    )
    before = int(time.time() * 1000)
    answer = request(home_proxy.url, media.legacy_path())  # no token: no whoami, no Synapse
    assert answer.status == 200 and answer.body == media.data
    assert wait_for(
        lambda: (sql(home, select, media.server_name, media.media_id)[0][0] or 0) >= before
    )
    assert sources(home_proxy, media.media_id)[-1] in ("cache", "s3")


# --- thumbnails ----------------------------------------------------------------------------

SIZES = [(32, 32), (96, 96), (320, 240), (640, 480), (50, 50), (1000, 1000), (0, 0), (10, 500)]


def thumb_path(media: Media, api: str, query: str) -> str:
    prefix = "/_matrix/client/v1/media" if api == "client" else "/_matrix/media/v3"
    return f"{prefix}/thumbnail/{media.server_name}/{media.media_id}?{query}"


@pytest.fixture(scope="module")
def picture(home: Synapse, origin: Synapse, origin_token: str, home_token: str) -> Media:
    """A PNG on B, fetched by A (which makes its thumbnails); its row predates authenticated
    media, so the legacy route serves its thumbnails too."""
    media = upload(
        origin.url,
        origin_token,
        png(800, 600, 3),
        content_type="image/png",
        name="pic.png",
        server_name=origin.server_name,
    )
    fetch_through_home(home, home_token, media)
    sql(
        home,
        "UPDATE remote_media_cache SET authenticated = ? WHERE media_origin = ? AND media_id = ?",
        False,
        media.server_name,
        media.media_id,
    )
    time.sleep(TTL)
    rows = sql(
        home,
        "SELECT COUNT(*) FROM remote_media_cache_thumbnails"
        " WHERE media_origin = ? AND media_id = ?",
        media.server_name,
        media.media_id,
    )
    assert rows[0][0] >= 4, "A made no thumbnails of the remote picture"
    return media


@pytest.mark.parametrize("evicted", ["in-store", "thumbnails-evicted", "all-evicted"])
@pytest.mark.parametrize("method", ["crop", "scale", "fit"])
def test_remote_thumbnails_match_synapse(
    home: Synapse,
    home_proxy: MediaProxy,
    home_token: str,
    picture: Media,
    method: str,
    evicted: str,
) -> None:
    def before() -> None:
        settle_fills(home)
        shutil.rmtree(home.media_store_path / thumbnail_dir(home, picture), ignore_errors=True)
        if evicted == "all-evicted":
            evict_remote(home, picture)

    for width, height in SIZES:
        for animated in ("", "&animated=true"):
            query = f"width={width}&height={height}&method={method}{animated}"
            for api, headers in (("client", bearer(home_token)), ("legacy", [])):
                for verb in ("GET", "HEAD"):
                    differential(
                        home,
                        home_proxy,
                        verb,
                        thumb_path(picture, api, query),
                        headers,
                        before_proxy=None if evicted == "in-store" else before,
                    )
    for headers in ([*bearer(home_token), ("If-None-Match", "1")], [], bearer("nope")):
        differential(
            home, home_proxy, "GET", thumb_path(picture, "client", "width=32&height=32"), headers
        )


def test_remote_thumbnail_is_put_back_by_the_proxy(
    home: Synapse,
    home_proxy: MediaProxy,
    home_token: str,
    picture: Media,
    s3_faults: FaultProxy,
) -> None:
    evict_remote(home, picture, thumbnails=True)
    s3_faults.reset()
    path = thumb_path(picture, "client", "width=96&height=96&method=crop")
    first = request(home_proxy.url, path, headers=bearer(home_token))
    second = request(home_proxy.url, path, headers=bearer(home_token))
    assert first.status == second.status == 200 and first.body == second.body
    folder = home.media_store_path / thumbnail_dir(home, picture)
    assert folder_bytes(folder, [first.body]) == [first.body]
    thumb_gets = [p for m, p in s3_faults.requests if m == "GET" and "remote_thumbnail" in p]
    assert len(thumb_gets) == 1
    # The original was only asked about (Synapse opens it first), never downloaded.
    assert s3_gets(s3_faults, remote_rel(home, picture)) == 0
    assert not (home.media_store_path / remote_rel(home, picture)).exists()
