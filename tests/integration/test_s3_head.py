"""HeadObject without botocore (s3get.Getter.head, what `cache evict` asks of every file it
evicts) answers as botocore's head_object does, on real SeaweedFS: the same sizes, None for a
missing key, any key; and a bodiless answer leaves its connection ready for the next call."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Iterator

import pytest

from devstack.seaweed import SeaweedFS
from media_proxy.config import S3Config
from media_proxy.s3 import S3
from tests.faults import FaultProxy
from tests.integration.media import proxy_s3_config

pytestmark = pytest.mark.integration

OBJECTS = {
    "local_content/ab/cd/efghijklmnopqrstuvwx": 1024,
    "local_content/ab/cd/empty": 0,
    "local_thumbnails/ab/cd/ef/96-96-image-png-crop": 100 * 1024,
    "remote_content/example.org:8448/ab/cd/a b+c%d~é": 7,
}
MISSING = ["local_content/ab/cd/none", "remote_content/example.org:8448/zz/zz/é none"]


@pytest.fixture(scope="module")
def stored(seaweed: SeaweedFS) -> Iterator[S3Config]:
    bucket = seaweed.create_bucket("synapse-sqlite")
    prefix = f"head-{uuid.uuid4().hex}/"
    client = seaweed.client()
    for rel, size in OBJECTS.items():
        client.put_object(Bucket=bucket.bucket, Key=prefix + rel, Body=b"h" * size)
    try:
        yield proxy_s3_config(bucket, prefix)
    finally:
        for rel in OBJECTS:
            client.delete_object(Bucket=bucket.bucket, Key=prefix + rel)


async def sizes(config: S3Config, *, lean: bool) -> list[int | None]:
    s3 = S3(config)
    await s3.start()
    try:
        assert (s3._getter is not None) == lean
        found = [await s3.size(rel) for rel in [*OBJECTS, *MISSING]]
        if s3._getter is not None:  # the HEADs went over the lean pool, not botocore's
            assert len(s3._getter.pool._idle) == 1
        return found
    finally:
        await s3.close()


def test_head_answers_as_botocore_does(stored: S3Config, s3_proxy: FaultProxy) -> None:
    config = dataclasses.replace(stored, endpoint_url=s3_proxy.url)
    s3_proxy.reset()
    ours = asyncio.run(sizes(config, lean=True))
    heads = s3_proxy.count("HEAD")
    connections = s3_proxy.connections
    # "auto" addressing is botocore's to sign and send
    botocores = asyncio.run(sizes(dataclasses.replace(config, addressing_style="auto"), lean=False))
    assert ours == botocores == [*OBJECTS.values(), *(None for _ in MISSING)]
    assert heads == len(OBJECTS) + len(MISSING)
    assert connections == 1  # each bodiless answer left the connection for the next HEAD
