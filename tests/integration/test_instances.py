"""Several media-proxy instances, each with a cache of its own, behind the shipped nginx config
(consistent hashing on server name + media id) over one S3 bucket: real nginx, SeaweedFS,
Synapse and two `media-proxy serve` processes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.nginx import Nginx
from devstack.proxy import MediaProxy
from devstack.synapse import Synapse
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Media, bearer, complete_file, request, upload
from tests.integration.test_faults import request_event, wait_for

pytestmark = pytest.mark.integration


def address(url: str) -> str:
    return url.removeprefix("http://")


@pytest.fixture
def instances(
    synapse: Synapse, s3_faults: FaultProxy, tmp_path: Path
) -> Iterator[list[MediaProxy]]:
    started = []
    try:
        for name in ("a", "b"):
            started.append(
                MediaProxy(
                    tmp_path / f"proxy-{name}",
                    synapse_config=synapse.config_path,
                    synapse_url=synapse.url,
                    config={
                        **TEST_PROXY_CONFIG,
                        "cache_path": str(tmp_path / f"cache-{name}"),
                        "s3": {"endpoint_url": s3_faults.url},
                    },
                ).start()
            )
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def front(synapse: Synapse, instances: list[MediaProxy], tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(
        tmp_path / "nginx",
        media_proxy=[address(p.url) for p in instances],
        synapse=address(synapse.url),
        server_name=synapse.server_name,
        client_max_body_size=str(synapse.config["max_upload_size"]),
    ).start()
    try:
        yield server
    finally:
        server.stop()


def cache_file(server: MediaProxy, media: Media) -> Path:
    return Path(server.config["cache_path"]) / media.rel


def fetch(front: Nginx, media: Media, token: str, rid: str) -> bytes:
    answer = request(
        front.url, media.client_path(), headers=[*bearer(token), ("X-Request-ID", rid)]
    )
    assert answer.status == 200 and answer.complete
    return answer.body


def owner(instances: list[MediaProxy], rid: str) -> tuple[MediaProxy, str]:
    """The instance that answered request `rid`, and from where (each logs a request just
    after answering it: wait for the event, not for time)."""

    def find() -> tuple[MediaProxy, str] | None:
        for server in instances:
            if server.process is None:
                continue
            for event in server.log_events():
                if event.get("event") == "request" and event.get("request_id") == rid:
                    return server, str(event["source"])
        return None

    found = wait_for(find)
    assert found is not None, f"no instance logged {rid}"
    return found


def test_each_file_fills_once_on_its_instance_and_survives_the_others_eviction_and_death(
    synapse: Synapse,
    user_token: str,
    instances: list[MediaProxy],
    front: Nginx,
    s3_faults: FaultProxy,
) -> None:
    tag = uuid.uuid4().hex[:8]
    placed: dict[str, list[Media]] = {p.url: [] for p in instances}
    s3_faults.reset()
    # upload until each instance owns a file (the hash decides; 40 tries make a miss
    # astronomically unlikely)
    for i in range(40):
        media = upload(
            synapse.url,
            user_token,
            os.urandom(30_000 + i),
            name=f"inst{i}.bin",
            server_name=synapse.server_name,
        )
        assert fetch(front, media, user_token, f"{tag}-{i}-1") == media.data
        server, source = owner(instances, f"{tag}-{i}-1")
        assert source == "s3"  # both caches start empty: a miss, filled once
        assert complete_file(cache_file(server, media), len(media.data)) == media.data
        other = next(p for p in instances if p is not server)
        assert not cache_file(other, media).exists()
        # again: the same instance, now a hit
        assert fetch(front, media, user_token, f"{tag}-{i}-2") == media.data
        assert owner(instances, f"{tag}-{i}-2") == (server, "cache")
        placed[server.url].append(media)
        if all(placed.values()):
            break
    assert all(placed.values()), "one instance got no file in 40 tries"
    gets = [p for m, p in s3_faults.requests if m == "GET" and "local_content" in p]
    assert len(gets) == sum(len(v) for v in placed.values())  # one GET per file

    first, second = instances
    # evicting on the first instance leaves the second's files alone
    for media in placed[first.url]:
        cache_file(first, media).unlink()
    for n, media in enumerate(placed[second.url]):
        assert fetch(front, media, user_token, f"{tag}-b{n}") == media.data
        assert owner(instances, f"{tag}-b{n}") == (second, "cache")

    # the first instance goes down: nginx moves its share to the second, which fills from S3
    first.stop()
    for n, media in enumerate(placed[first.url]):
        assert fetch(front, media, user_token, f"{tag}-down{n}") == media.data
        assert request_event(second, f"{tag}-down{n}")["source"] == "s3"
        assert complete_file(cache_file(second, media), len(media.data)) == media.data
