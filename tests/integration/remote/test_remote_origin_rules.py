"""`federation_domain_whitelist` and `prevent_media_downloads_from` on cached remote media:
a homeserver A' of its own (SQLite, S3) caches media from B, is restarted with the lists set,
and the proxy in front of it (restarted to read them) must answer exactly like it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import SeaweedFS, Synapse
from devstack.proxy import MediaProxy
from devstack.samples import png
from tests.conftest import PASSWORD
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Media, bearer, upload
from tests.integration.remote.test_remote_media import fetch_through_home, source_of
from tests.integration.test_serving import differential


@pytest.fixture(scope="module")
def guarded(
    devstack_dir: Path, seaweed: SeaweedFS, origin: Synapse, s3_proxy: FaultProxy
) -> Iterator[tuple[Synapse, MediaProxy, str]]:
    server = Synapse(
        devstack_dir / "synapse-guarded",
        s3=seaweed.create_bucket("guarded"),
        federation=True,
    ).start()
    proxy = MediaProxy(
        devstack_dir / "media-proxy-guarded",
        synapse_config=server.config_path,
        synapse_url=server.url,
        workers=2,
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
    )
    try:
        yield server, proxy, server.register_user("frank", PASSWORD)
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture(scope="module")
def cached(guarded: tuple[Synapse, MediaProxy, str], origin: Synapse, origin_token: str) -> Media:
    """A picture from B that A' cached (with thumbnails) before the lists were set."""
    server, _, token = guarded
    media = upload(
        origin.url,
        origin_token,
        png(320, 240, 5),
        content_type="image/png",
        name="p.png",
        server_name=origin.server_name,
    )
    fetch_through_home(server, token, media)
    return media


def restart_with(guarded: tuple[Synapse, MediaProxy, str], **settings: object) -> None:
    server, proxy, _ = guarded
    proxy.stop()
    server.stop()
    # write_config updates the previous homeserver.yaml: every list is given each time
    server.extra_config = {
        "federation_domain_whitelist": None,
        "prevent_media_downloads_from": [],
        "dynamic_thumbnails": False,
        **settings,
    }
    server.start()
    proxy.start()


def forms(media: Media, token: str) -> list[tuple[str, list[tuple[str, str]]]]:
    thumb = f"/thumbnail/{media.server_name}/{media.media_id}?width=32&height=32&method=crop"
    return [
        (media.client_path(), bearer(token)),
        (media.legacy_path(), []),
        (media.legacy_path("v3", "?allow_remote=false"), []),
        ("/_matrix/client/v1/media" + thumb, bearer(token)),
        ("/_matrix/media/v3" + thumb, []),
    ]


@pytest.mark.parametrize(
    ("lists", "download", "thumbnail"),
    [
        # B outside the whitelist: 403 (and the prevent list, for thumbnails, comes first)
        ({"federation_domain_whitelist": ["elsewhere.example"]}, 403, 403),
        ({"prevent_media_downloads_from": ["ORIGIN"]}, 404, 404),
        (
            {
                "federation_domain_whitelist": ["elsewhere.example"],
                "prevent_media_downloads_from": ["ORIGIN"],
            },
            403,
            404,
        ),
        ({"federation_domain_whitelist": ["ORIGIN"]}, 200, 200),
    ],
    ids=["whitelist", "prevent", "both", "whitelisted"],
)
def test_origin_lists_match_synapse(
    guarded: tuple[Synapse, MediaProxy, str],
    cached: Media,
    lists: dict[str, list[str]],
    download: int,
    thumbnail: int,
    request: pytest.FixtureRequest,
) -> None:
    request_id = request.node.callspec.id
    server, proxy, token = guarded
    restart_with(
        guarded,
        **{k: [cached.server_name if v == "ORIGIN" else v for v in vs] for k, vs in lists.items()},
    )
    for n, (path, headers) in enumerate(forms(cached, token)):
        for method in ("GET", "HEAD"):
            rid = f"{request_id}-{n}-{method}"
            ours, _ = differential(server, proxy, method, path, [*headers, ("X-Request-ID", rid)])
            assert source_of(proxy, rid) != "synapse"  # answered by the proxy itself
            expected = thumbnail if "/thumbnail/" in path else download
            if "allow_remote=false" in path:
                expected = 404
            elif expected == 200 and not any(k == "Authorization" for k, _ in headers):
                expected = 404  # an authenticated row on a legacy route
            assert ours.status == expected, (path, ours.status, ours.body)
            if ours.status == 403 and method == "GET":
                assert json.loads(ours.body) == {
                    "errcode": "M_FORBIDDEN",
                    "error": f"Federation denied with {cached.server_name}.",
                }


def test_dynamic_remote_thumbnails_match_synapse(
    guarded: tuple[Synapse, MediaProxy, str], cached: Media
) -> None:
    """With dynamic_thumbnails only exact rows are the proxy's; Synapse generates the rest
    (and stores them, after which they are exact rows too)."""
    server, proxy, token = guarded
    restart_with(guarded, dynamic_thumbnails=True)
    base = f"/_matrix/client/v1/media/thumbnail/{cached.server_name}/{cached.media_id}"
    for query in (
        "width=32&height=32&method=crop",  # a stored JPEG: not the PNG asked for
        "width=32&height=32&method=crop&animated=true",
        "width=77&height=55&method=scale",  # generated and stored by Synapse
        "width=10&height=10&method=fit",
    ):
        differential(server, proxy, "GET", f"{base}?{query}", bearer(token))
    time.sleep(float(TEST_PROXY_CONFIG["metadata_cache_ttl"]) + 0.2)  # the new row is seen
    headers = [*bearer(token), ("X-Request-ID", "dynamic-exact")]
    ours, _ = differential(server, proxy, "GET", f"{base}?width=77&height=55&method=scale", headers)
    assert ours.status == 200 and ours.header("content-type") == "image/png"
    assert source_of(proxy, "dynamic-exact") in ("cache", "s3")  # an exact row now
