"""Range on downloads (beyond Synapse): hits, misses from a growing fill, and `ranges: false`,
against real SeaweedFS, Synapse (both databases) and `media-proxy serve` with 3 workers."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import uuid
from pathlib import Path

import pytest

from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.synapse import Synapse
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Answer, Media, bearer, evict, request, store_file, upload
from tests.integration.test_faults import request_event

pytestmark = pytest.mark.integration

SIZE = 3 * 1024 * 1024 + 17


@pytest.fixture(scope="module")
def video(synapse: Synapse, user_token: str) -> Media:
    return upload(
        synapse.url,
        user_token,
        os.urandom(SIZE),
        content_type="video/mp4",
        name="seek.mp4",
        server_name=synapse.server_name,
    )


def ranged(
    server: str, media: Media, token: str, value: str | None, *extra: tuple[str, str], **kw: str
) -> Answer:
    headers = [*bearer(token), *([("Range", value)] if value is not None else []), *extra]
    return request(server, media.client_path(), headers=headers, **kw)


def wait_for_file(synapse: Synapse, media: Media, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    path = store_file(synapse, media)
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size == len(media.data):
            return path.read_bytes() == media.data
        time.sleep(0.02)
    return False


# (Range header, expected status, expected slice of the body) for a file of SIZE bytes
FORMS = [
    ("bytes=0-99", 206, slice(0, 100)),
    ("bytes=1000-", 206, slice(1000, SIZE)),
    ("bytes=-500", 206, slice(SIZE - 500, SIZE)),
    ("bytes=2000000-99999999", 206, slice(2000000, SIZE)),  # clamped to the end
    ("bytes=0-0", 206, slice(0, 1)),
    ("bytes=5-4", 200, slice(0, SIZE)),  # invalid: ignored
    ("bytes=0-1,10-20", 200, slice(0, SIZE)),  # several ranges: the whole file
    ("pages=1-2", 200, slice(0, SIZE)),
]


@pytest.mark.parametrize("evicted", [False, True], ids=["hit", "miss"])
@pytest.mark.parametrize(("value", "status", "part"), FORMS, ids=[f[0] for f in FORMS])
def test_range_forms(
    synapse: Synapse,
    proxy: MediaProxy,
    user_token: str,
    video: Media,
    evicted: bool,
    value: str,
    status: int,
    part: slice,
) -> None:
    if evicted:
        evict(synapse, video)
    answer = ranged(proxy.url, video, user_token, value)
    assert answer.status == status and answer.complete
    assert answer.body == video.data[part]
    assert answer.header("content-length") == str(len(video.data[part]))
    assert answer.header("accept-ranges") == "bytes"
    if status == 206:
        last = part.start + len(video.data[part]) - 1
        assert answer.header("content-range") == f"bytes {part.start}-{last}/{SIZE}"
        # the rest of the 200's headers, unchanged
        whole = request(proxy.url, video.client_path(), headers=bearer(user_token))
        same = {"content-type", "content-disposition", "etag", "cache-control"}
        assert {(k, v) for k, v in answer.headers if k in same} == {
            (k, v) for k, v in whole.headers if k in same
        }
    else:
        assert answer.header("content-range") is None
    if evicted:
        assert wait_for_file(synapse, video)  # the whole file was filled behind the range


@pytest.mark.parametrize("evicted", [False, True], ids=["hit", "miss"])
def test_unsatisfiable_is_416_with_the_length(
    synapse: Synapse, proxy: MediaProxy, user_token: str, video: Media, evicted: bool
) -> None:
    if evicted:
        evict(synapse, video)
    for value in (f"bytes={SIZE}-", f"bytes={SIZE + 10}-{SIZE + 20}", "bytes=-0"):
        answer = ranged(proxy.url, video, user_token, value)
        assert answer.status == 416, value
        assert answer.header("content-range") == f"bytes */{SIZE}"
        assert json.loads(answer.body)["errcode"] == "M_UNKNOWN"


def test_if_range(proxy: MediaProxy, user_token: str, video: Media) -> None:
    matching = ranged(proxy.url, video, user_token, "bytes=10-19", ("If-Range", "1"))
    assert matching.status == 206 and matching.body == video.data[10:20]
    for validator in ('"1"', "2", "Wed, 21 Oct 2015 07:28:00 GMT"):
        other = ranged(proxy.url, video, user_token, "bytes=10-19", ("If-Range", validator))
        assert other.status == 200 and other.body == video.data


def test_head_with_range(proxy: MediaProxy, user_token: str, video: Media) -> None:
    answer = ranged(proxy.url, video, user_token, "bytes=100-199", method="HEAD")
    assert answer.status == 206 and answer.body == b""
    assert answer.header("content-length") == "100"
    assert answer.header("content-range") == f"bytes 100-199/{SIZE}"


def test_not_modified_wins_over_range(proxy: MediaProxy, user_token: str, video: Media) -> None:
    answer = ranged(proxy.url, video, user_token, "bytes=0-9", ("If-None-Match", "1"))
    assert answer.status == 304


def test_thumbnails_do_not_advertise_ranges(
    synapse: Synapse, proxy: MediaProxy, user_token: str
) -> None:
    rid = f"thumb-range-{uuid.uuid4().hex[:8]}"
    picture = upload(
        synapse.url,
        user_token,
        png(320, 240, 7),
        content_type="image/png",
        server_name=synapse.server_name,
    )
    answer = request(
        proxy.url,
        f"/_matrix/client/v1/media/thumbnail/{picture.server_name}/{picture.media_id}"
        "?width=96&height=96&method=crop",
        headers=[*bearer(user_token), ("Range", "bytes=0-9"), ("X-Request-ID", rid)],
    )
    assert answer.status == 200 and answer.body.startswith(b"\x89PNG")
    assert answer.header("accept-ranges") is None and answer.header("content-range") is None
    assert request_event(proxy, rid)["source"] == "cache"  # the proxy's, whole


def test_concurrent_ranged_misses_make_one_fill(
    synapse: Synapse, proxy: MediaProxy, user_token: str, s3_faults: FaultProxy
) -> None:
    media = upload(
        synapse.url,
        user_token,
        os.urandom(6 * 1024 * 1024),
        content_type="video/webm",
        name="seek2.webm",
        server_name=synapse.server_name,
    )
    evict(synapse, media)
    s3_faults.reset()
    s3_faults.set_latency(0.3)  # both requests arrive while the fill is starting
    forms = ["bytes=5000000-5000999", "bytes=-1000", "bytes=0-1023", "bytes=3000000-"]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(forms)) as pool:
            answers = list(pool.map(lambda v: ranged(proxy.url, media, user_token, v), forms))
    finally:
        s3_faults.set_latency(0)
    parts = [slice(5000000, 5001000), slice(-1000, None), slice(0, 1024), slice(3000000, None)]
    for answer, part in zip(answers, parts, strict=True):
        assert answer.status == 206 and answer.body == media.data[part]
    gets = [p for m, p in s3_faults.requests if m == "GET" and p.split("?")[0].endswith(media.rel)]
    assert len(gets) == 1
    assert wait_for_file(synapse, media)


def test_ranges_false_gives_synapses_exact_answers(
    synapse: Synapse, user_token: str, video: Media, s3_proxy: FaultProxy, devstack_dir: Path
) -> None:
    server = MediaProxy(
        devstack_dir / f"ranges-off-{uuid.uuid4().hex[:8]}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={**TEST_PROXY_CONFIG, "ranges": False, "s3": {"endpoint_url": s3_proxy.url}},
    ).start()
    try:
        for value in ("bytes=0-99", f"bytes={SIZE}-", None):
            ours = ranged(server.url, video, user_token, value)
            theirs = ranged(synapse.url, video, user_token, value)
            assert ours.status == theirs.status == 200
            assert ours.header("accept-ranges") is None
            assert ours.comparable() == theirs.comparable()
            assert ours.body == video.data
    finally:
        server.stop()
