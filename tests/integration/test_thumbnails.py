"""Thumbnails of local media, differential against Synapse (SQLite and PostgreSQL).

Synapse generates the default thumbnail sizes of an uploaded PNG and its S3 provider uploads
them; the same request is sent to Synapse and to the proxy (3 workers) with the thumbnail
files in the store and evicted, and status, headers and body must be equal.
"""

from __future__ import annotations

import shutil
import time
import uuid

import pytest

from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.synapse import Synapse
from media_proxy import paths
from tests.faults import FaultProxy
from tests.integration.media import Media, bearer, folder_bytes, request, settle_fills, sql, upload
from tests.integration.test_faults import request_event
from tests.integration.test_serving import differential

SIZES = [
    (32, 32),
    (96, 96),
    (320, 240),
    (640, 480),
    (800, 600),
    (50, 50),
    (1000, 1000),
    (0, 0),
    (10, 500),
]


@pytest.fixture(scope="module")
def picture(synapse: Synapse, user_token: str) -> Media:
    media = upload(
        synapse.url,
        user_token,
        png(640, 480, 90),
        content_type="image/png",
        name="pic.png",
        server_name=synapse.server_name,
    )
    rows = sql(
        synapse,
        "SELECT COUNT(*) FROM local_media_repository_thumbnails WHERE media_id = ?",
        media.media_id,
    )
    assert rows[0][0] >= 4, "Synapse made no thumbnails"
    # a row from before authenticated media, so the legacy route serves it too
    sql(
        synapse,
        "UPDATE local_media_repository SET authenticated = ? WHERE media_id = ?",
        False,
        media.media_id,
    )
    return media


def thumb_path(media: Media, api: str, query: str) -> str:
    prefix = "/_matrix/client/v1/media" if api == "client" else "/_matrix/media/v3"
    return f"{prefix}/thumbnail/{media.server_name}/{media.media_id}?{query}"


def evict_thumbnails(synapse: Synapse, media: Media) -> None:
    settle_fills(synapse)
    folder = synapse.media_store_path / paths.local_thumbnail_dir(media.media_id)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("evicted", [False, True], ids=["in-store", "evicted"])
@pytest.mark.parametrize("method", ["crop", "scale", "CROP", "fit"])
def test_thumbnails_match_synapse(
    synapse: Synapse,
    proxy: MediaProxy,
    user_token: str,
    picture: Media,
    method: str,
    evicted: bool,
) -> None:
    time.sleep(float(proxy.config["metadata_cache_ttl"]))  # the row update reaches the proxy
    before = (lambda: evict_thumbnails(synapse, picture)) if evicted else None
    for width, height in SIZES:
        for animated in ("", "&animated=true"):
            query = f"width={width}&height={height}&method={method}{animated}"
            for api, headers in (("client", bearer(user_token)), ("legacy", [])):
                for verb in ("GET", "HEAD"):
                    differential(
                        synapse,
                        proxy,
                        verb,
                        thumb_path(picture, api, query),
                        headers,
                        before_proxy=before,
                    )
    differential(
        synapse,
        proxy,
        "GET",
        thumb_path(picture, "client", "width=32&height=32"),
        [*bearer(user_token), ("If-None-Match", "1")],
    )


def test_thumbnail_errors_match_synapse(
    synapse: Synapse, proxy: MediaProxy, user_token: str, picture: Media
) -> None:
    for query in ("width=32", "width=x&height=1", "width=1&height=1&animated=maybe", ""):
        differential(
            synapse, proxy, "GET", thumb_path(picture, "client", query), bearer(user_token)
        )
    for headers in ([], bearer("nope")):
        differential(
            synapse, proxy, "GET", thumb_path(picture, "client", "width=1&height=1"), headers
        )


def test_thumbnails_are_served_and_refilled_by_the_proxy(
    synapse: Synapse, proxy: MediaProxy, user_token: str, picture: Media, s3_faults: FaultProxy
) -> None:
    evict_thumbnails(synapse, picture)
    query = "width=96&height=96&method=crop"
    tag = uuid.uuid4().hex[:8]
    path = thumb_path(picture, "client", query)
    first = request(proxy.url, path, headers=[*bearer(user_token), ("X-Request-ID", f"{tag}-1")])
    folder = synapse.media_store_path / paths.local_thumbnail_dir(picture.media_id)
    assert folder_bytes(folder, [first.body]) == [first.body]  # put back
    second = request(proxy.url, path, headers=[*bearer(user_token), ("X-Request-ID", f"{tag}-2")])
    assert first.status == second.status == 200 and first.body == second.body
    assert first.header("content-type") == "image/png"
    assert first.header("content-security-policy") is None  # thumbnails have none in Synapse
    assert [m for m, p in s3_faults.requests if m == "GET" and "local_thumbnails" in p] == ["GET"]
    assert [request_event(proxy, f"{tag}-{i}")["source"] for i in (1, 2)] == ["s3", "cache"]
