"""A segment's listing cut into ranges listed at once (inventory.ranged_pages) gives exactly the
keys, in exactly the order, of one ListObjectsV2 listing, on real SeaweedFS: keys of folders the
store does not have, before, between and after its folders, ranges of several pages, and any
number of ranges in flight. (No key here has a name sorting below "/" beside a folder's name,
such as "ab-x" beside "ab/": SeaweedFS lists a folder whole before such a name, against S3's
byte order, and the join's order check rejects that listing whether cut or not.)"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.seaweed import SeaweedFS
from media_proxy.config import S3Config
from media_proxy.inventory import RANGE_KEYS, ListingJoin, range_bounds, ranged_pages
from media_proxy.s3 import S3
from tests.faults import FaultProxy
from tests.integration.media import proxy_s3_config

pytestmark = pytest.mark.integration

SEG = "local_content/"
# The store's folders of the segment: ranges start at these.
FOLDERS = ["AB", "ab", "ac", "b", "c", "d"]
# Keys S3 holds outside those folders, sorting before, between and after them.
STRAYS = ["0", "AA/x", "aa/z", "abc/q", "b0/1", "bz", "c0", "zz/1"]


@pytest.fixture(scope="module")
def listed(seaweed: SeaweedFS) -> Iterator[tuple[S3Config, list[str]]]:
    """A prefix of its own in the shared bucket, holding the segment's keys (store paths)."""
    bucket = seaweed.create_bucket("synapse-sqlite")
    prefix = f"listing-ranges-{uuid.uuid4().hex}/"
    rng = random.Random(7)
    rels = [SEG + s for s in STRAYS]
    for folder in FOLDERS:
        for i in range(rng.randrange(1, 12)):
            rels.append(f"{SEG}{folder}/{rng.choice('xyz')}{i}/{rng.randrange(100)}")
    rels.append("local_thumbnails/ab/cd/efgh/32-32-image-png-crop")  # another segment
    client = seaweed.client()
    for rel in rels:
        client.put_object(Bucket=bucket.bucket, Key=prefix + rel, Body=b"x" * (len(rel) % 7))
    config = proxy_s3_config(bucket, prefix)
    try:
        yield config, sorted(set(rels))
    finally:
        for rel in rels:
            client.delete_object(Bucket=bucket.bucket, Key=prefix + rel)


async def _both(
    config: S3Config, window: int, page_size: int, counted: FaultProxy
) -> tuple[list[str], list[str], int]:
    """The keys listed in ranges, in one listing, and the ranged listing's requests."""
    s3 = S3(config)
    await s3.start()
    # "auto" addressing is botocore's to sign and parse: both paths send StartAfter.
    assert (s3._getter is None) == (config.addressing_style == "auto")
    try:
        bounds = range_bounds(SEG, FOLDERS, RANGE_KEYS * 100)
        assert len(bounds) == len(FOLDERS) - 1
        counted.reset()
        ranged = [
            key
            async for page in ranged_pages(s3, SEG, bounds, window=window, page_size=page_size)
            for key, _, _ in page
        ]
        requests = sum(1 for r in counted.requests if "list-type=2" in r.path)
        whole = [key async for page in s3.list_pages(SEG) for key, _, _ in page]
        return ranged, whole, requests
    finally:
        await s3.close()


@pytest.mark.parametrize(
    ("window", "page_size", "addressing"),
    [(1, 1000, "path"), (2, 3, "path"), (8, 2, "path"), (32, 1, "path"), (2, 3, "auto")],
)
def test_ranges_list_what_one_listing_lists(
    listed: tuple[S3Config, list[str]],
    s3_proxy: FaultProxy,
    window: int,
    page_size: int,
    addressing: str,
) -> None:
    config, rels = listed
    config = dataclasses.replace(
        config,
        addressing_style=addressing,  # type: ignore[arg-type]
        endpoint_url=s3_proxy.url,  # which counts the requests
    )
    ranged, whole, requests = asyncio.run(_both(config, window, page_size, s3_proxy))
    assert whole == [r for r in rels if r.startswith(SEG)]
    assert ranged == whole
    # Each range starts where it begins (StartAfter), not at the segment's start: its pages
    # hold its own keys, and at most one more page each (the one that crosses its end).
    assert requests <= math.ceil(len(whole) / page_size) + len(FOLDERS)


def test_the_join_finds_each_file_s_size_through_ranges(
    listed: tuple[S3Config, list[str]], tmp_path: Path
) -> None:
    config, rels = listed
    root = tmp_path
    for folder in FOLDERS:  # the store's folders, so that the join plans ranges at them
        (root / SEG / folder).mkdir(parents=True)
    # Files in the folders the join samples (first, middle, last): a range per folder.
    for folder in ("AB", "b", "d"):
        for i in range(RANGE_KEYS):
            (root / SEG / folder / str(i)).touch()
    asked = sorted([*(r for r in rels if r.startswith(SEG)), SEG + "ab/zz/none", SEG + "c/0"])

    async def sizes() -> list[int | None]:
        s3 = S3(config)
        await s3.start()
        join = ListingJoin(s3, str(root))
        try:
            found = [await join.size(rel) for rel in asked]
            assert join.ranges == len(FOLDERS)
            return found
        finally:
            await join.close()
            await s3.close()

    found = dict(zip(asked, asyncio.run(sizes()), strict=True))
    assert found == {rel: None if rel not in rels else len(rel) % 7 for rel in asked}
