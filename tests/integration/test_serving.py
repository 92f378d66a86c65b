"""The serving path against real SeaweedFS, a real Synapse (SQLite and PostgreSQL) and the real
`media-proxy serve` command with several workers.

Differential tests send the same request to Synapse and to the proxy and compare status,
headers (all but Server and Date) and body, with the file in the store and evicted.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import socket
import stat
import time

import pytest

from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths
from tests.faults import FaultProxy
from tests.integration.media import (
    Answer,
    Media,
    bearer,
    evict,
    request,
    sql,
    store_file,
    stored_bytes,
    upload,
)

pytestmark = pytest.mark.integration

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(40_000)


def wait_for(check, timeout: float = 10.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(interval)


def s3_gets(faults: FaultProxy, media: Media) -> int:
    return sum(1 for m, p in faults.requests if m == "GET" and p.split("?")[0].endswith(media.rel))


@pytest.fixture(scope="module")
def uploaded(synapse: Synapse, user_token: str) -> dict[str, Media]:
    """A set of media covering the header rules, uploaded through Synapse."""
    sn = synapse.server_name

    def up(data: bytes, content_type: str, name: str | None) -> Media:
        return upload(
            synapse.url, user_token, data, content_type=content_type, name=name, server_name=sn
        )

    media = {
        "png": up(PNG, "image/png", "cat.png"),
        "html": up(b"<script>alert(1)</script>" * 100, "text/html", "page.html"),
        "svg": up(
            b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "\u00e9t\u00e9.svg"
        ),
        "text": up(b"hello " * 1000, "TEXT/PLAIN", None),
        "params": up(b"a,b\n" * 100, "text/csv; charset=latin1", "a b/c.csv"),
        "big": up(os.urandom(9 * 1024 * 1024 + 17), "video/mp4", "clip.mp4"),
        "legacy_ok": up(os.urandom(5000), "image/jpeg", "old.jpg"),
        "quarantined": up(os.urandom(6000), "image/gif", "q.gif"),
    }
    # Rows made before enable_authenticated_media stay servable on the legacy routes.
    sql(
        synapse,
        "UPDATE local_media_repository SET authenticated = ? WHERE media_id = ?",
        False,
        media["legacy_ok"].media_id,
    )
    return media


@pytest.fixture(scope="module")
def quarantined(synapse: Synapse, admin_token: str, uploaded: dict[str, Media]) -> Media:
    media = uploaded["quarantined"]
    answer = request(
        synapse.url,
        f"/_synapse/admin/v1/media/quarantine/{media.server_name}/{media.media_id}",
        method="POST",
        headers=[*bearer(admin_token), ("Content-Type", "application/json")],
        body=b"{}",
    )
    assert answer.status == 200, answer.body
    return media


def cases(media: Media, token: str, other: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(method, path, headers) for every download form of one media."""
    auth = bearer(token)
    out: list[tuple[str, str, list[tuple[str, str]]]] = []
    for method in ("GET", "HEAD"):
        out += [
            (method, media.client_path(), auth),
            (method, media.client_path("/other%20name.png"), auth),
            (method, media.client_path("/plain.txt"), auth),
            (method, media.client_path("/"), auth),
            (method, media.client_path(f"?access_token={token}"), []),
            (method, media.legacy_path("v3"), []),
            (method, media.legacy_path("r0", "/x.bin"), []),
            (method, media.legacy_path("v1"), []),
        ]
    out += [
        ("GET", media.client_path(), [*auth, ("If-None-Match", "1")]),
        ("GET", media.client_path(), [*auth, ("If-None-Match", '"1"')]),
        ("GET", media.legacy_path(), [("If-None-Match", "1")]),
        ("GET", media.client_path(), []),
        ("GET", media.client_path(), bearer("not-a-token")),
        ("GET", media.client_path(), [("Authorization", f"bearer {token}")]),
        ("GET", media.client_path(), [("Authorization", f"Bearer  {token}")]),
        ("GET", media.client_path(), [*auth, ("Authorization", f"Bearer {other}")]),
        ("GET", media.client_path(f"?access_token={token}"), auth),
        ("GET", media.client_path("?timeout_ms=abc"), auth),
        ("GET", media.client_path("?timeout_ms=100"), auth),
        ("GET", media.client_path("?admin_unsafely_bypass_quarantine=true"), auth),
        ("HEAD", media.client_path(), bearer("not-a-token")),
        ("GET", media.client_path(), [*auth, ("Range", "bytes=0-9,20-29")]),  # several: whole
    ]
    return out


def differential(
    synapse: Synapse,
    proxy: MediaProxy,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    *,
    before_proxy=None,
) -> tuple[Answer, Answer]:  # type: ignore[no-untyped-def]
    if before_proxy:
        before_proxy()
    ours = request(proxy.url, path, method=method, headers=headers)
    if before_proxy:
        before_proxy()
    theirs = request(synapse.url, path, method=method, headers=headers)
    assert ours.comparable() == theirs.comparable(), (method, path, headers, ours, theirs)
    return ours, theirs


@pytest.mark.parametrize("evicted", [False, True], ids=["in-store", "evicted"])
@pytest.mark.parametrize("kind", ["png", "html", "svg", "text", "params", "big", "legacy_ok"])
def test_download_forms_match_synapse(
    synapse: Synapse,
    proxy: MediaProxy,
    user_token: str,
    second_token: str,
    uploaded: dict[str, Media],
    kind: str,
    evicted: bool,
) -> None:
    media = uploaded[kind]
    for method, path, headers in cases(media, user_token, second_token):
        differential(
            synapse,
            proxy,
            method,
            path,
            headers,
            before_proxy=(lambda: evict(synapse, media)) if evicted else None,
        )
    evict(synapse, media)
    assert request(proxy.url, media.client_path(), headers=bearer(user_token)).body == media.data
    assert stored_bytes(synapse, media) == media.data  # written back


def test_error_forms_match_synapse(
    synapse: Synapse, proxy: MediaProxy, user_token: str, quarantined: Media
) -> None:
    time.sleep(proxy_metadata_ttl(proxy))  # the quarantine reaches the proxy within the TTL
    sn = synapse.server_name
    auth = bearer(user_token)
    forms = [
        quarantined.client_path(),
        quarantined.legacy_path(),
        f"/_matrix/client/v1/media/download/{sn}/NoSuchMediaIdAtAllHereX",
        f"/_matrix/media/v3/download/{sn}/NoSuchMediaIdAtAllHereX",
        f"/_matrix/client/v1/media/download/{sn}/abc",
        f"/_matrix/client/v1/media/download/{sn}/..%2F..%2Fetc%2Fpasswd",
        f"/_matrix/client/v1/media/download/{sn}/%2E%2E",
        f"/_matrix/media/v3/download/{sn}/..%2Fhomeserver.db",
        f"/_matrix/client/v1/media/download/{sn}/a%00b",
        "/_matrix/client/v1/media/download/bad_server!/abcdefgh",
        "/_matrix/client/v1/media/download//abcdefgh",
        f"/_matrix/client/v1/media/download/{sn}/abcdefgh/x/y",
        f"/_matrix/media/v3/download/{sn}/",
    ]
    for path in forms:
        for method in ("GET", "HEAD"):
            differential(synapse, proxy, method, path, auth)


def test_authenticated_media_hidden_on_legacy_routes(
    synapse: Synapse, proxy: MediaProxy, uploaded: dict[str, Media]
) -> None:
    media = uploaded["png"]  # created with enable_authenticated_media on: flag set
    ours, _ = differential(synapse, proxy, "GET", media.legacy_path(), [])
    assert ours.status == 404
    assert json.loads(ours.body) == {"errcode": "M_NOT_FOUND", "error": "Not found"}


def test_quarantined_is_404_everywhere(
    synapse: Synapse, proxy: MediaProxy, user_token: str, quarantined: Media
) -> None:
    time.sleep(proxy_metadata_ttl(proxy))
    evict(synapse, quarantined)
    ours = request(proxy.url, quarantined.client_path(), headers=bearer(user_token))
    assert ours.status == 404
    assert json.loads(ours.body)["errcode"] == "M_NOT_FOUND"
    assert not store_file(synapse, quarantined).exists()  # never fetched from S3


def proxy_metadata_ttl(proxy: MediaProxy) -> float:
    return float(proxy.config.get("metadata_cache_ttl", 5.0)) + 0.2


def test_evicted_file_is_refilled_byte_for_byte(
    synapse: Synapse,
    proxy: MediaProxy,
    user_token: str,
    uploaded: dict[str, Media],
    s3_faults: FaultProxy,
) -> None:
    media = uploaded["big"]
    evict(synapse, media)
    s3_faults.reset()
    answer = request(proxy.url, media.client_path(), headers=bearer(user_token))
    assert answer.status == 200 and answer.body == media.data
    assert stored_bytes(synapse, media) == media.data
    stored = store_file(synapse, media)
    mode = stat.S_IMODE(stored.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    assert s3_gets(s3_faults, media) == 1
    again = request(proxy.url, media.client_path(), headers=bearer(user_token))
    assert again.body == media.data
    assert s3_gets(s3_faults, media) == 1  # the second one was a hit
    assert not any((synapse.media_store_path / paths.FILL_DIR).iterdir())


def test_short_store_file_counts_as_missing(
    synapse: Synapse, proxy: MediaProxy, user_token: str, uploaded: dict[str, Media]
) -> None:
    media = uploaded["legacy_ok"]
    store_file(synapse, media).write_bytes(media.data[:100])  # a crashed in-place write
    answer = request(proxy.url, media.client_path(), headers=bearer(user_token))
    assert answer.body == media.data
    assert stored_bytes(synapse, media) == media.data


def test_concurrent_misses_make_one_s3_get_across_workers(
    synapse: Synapse, proxy: MediaProxy, user_token: str, s3_faults: FaultProxy
) -> None:
    assert proxy.workers >= 3
    media = upload(
        synapse.url,
        user_token,
        os.urandom(12 * 1024 * 1024),
        name="many.bin",
        server_name=synapse.server_name,
    )
    evict(synapse, media)
    s3_faults.reset()
    s3_faults.set_latency(0.3)  # keep the fill open while the requests pile up
    try:
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            answers = list(
                pool.map(
                    lambda _: request(proxy.url, media.client_path(), headers=bearer(user_token)),
                    range(20),
                )
            )
    finally:
        s3_faults.set_latency(0)
    assert [a.status for a in answers] == [200] * 20
    assert all(a.body == media.data for a in answers)
    assert s3_gets(s3_faults, media) == 1
    assert stored_bytes(synapse, media) == media.data


def test_s3_body_cut_short_aborts_clients_and_leaves_no_file(
    synapse: Synapse, proxy: MediaProxy, user_token: str, s3_faults: FaultProxy
) -> None:
    media = upload(
        synapse.url,
        user_token,
        os.urandom(3 * 1024 * 1024),
        name="cut.bin",
        server_name=synapse.server_name,
    )
    evict(synapse, media)
    s3_faults.cut_after(
        1024 * 1024, match=lambda method, path: method == "GET" and media.rel in path
    )
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(
                pool.map(
                    lambda _: request(proxy.url, media.client_path(), headers=bearer(user_token)),
                    range(3),
                )
            )
    finally:
        s3_faults.clear_faults()
    for answer in answers:
        # Either the fill broke under it (status line sent, body aborted) or, having found
        # nothing to follow, it was answered by Synapse, which reads S3 directly.
        assert answer.status == 200
        assert not answer.complete or answer.body == media.data, answer.error
    assert any(not a.complete for a in answers)
    assert not store_file(synapse, media).exists() or stored_bytes(synapse, media) == media.data
    fill_dir = synapse.media_store_path / paths.FILL_DIR
    assert wait_for(lambda: not any(fill_dir.iterdir()))
    # Afterwards the file is served and written back normally.
    answer = request(proxy.url, media.client_path(), headers=bearer(user_token))
    assert answer.body == media.data
    assert stored_bytes(synapse, media) == media.data


def test_client_hanging_up_does_not_stop_the_fill(
    synapse: Synapse, proxy: MediaProxy, user_token: str
) -> None:
    media = upload(
        synapse.url,
        user_token,
        os.urandom(8 * 1024 * 1024),
        name="hangup.bin",
        server_name=synapse.server_name,
    )
    evict(synapse, media)
    sock = socket.create_connection(("127.0.0.1", proxy.port))
    sock.sendall(
        f"GET {media.client_path()} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {user_token}\r\n\r\n".encode()
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    stored = store_file(synapse, media)
    assert wait_for(lambda: stored.exists() and stored.stat().st_size == len(media.data))
    assert stored.read_bytes() == media.data


def test_upload_and_async_upload_through_the_proxy(
    synapse: Synapse, proxy: MediaProxy, user_token: str
) -> None:
    data = os.urandom(200_000)
    media = upload(
        proxy.url,
        user_token,
        data,
        content_type="image/png",
        name="via-proxy.png",
        server_name=synapse.server_name,
    )
    assert request(proxy.url, media.client_path(), headers=bearer(user_token)).body == data

    created = request(
        proxy.url,
        "/_matrix/media/v1/create",
        method="POST",
        headers=[*bearer(user_token), ("Content-Type", "application/json")],
        body=b"{}",
    )
    assert created.status == 200, created.body
    media_id = json.loads(created.body)["content_uri"].rsplit("/", 1)[1]
    pending = Media(media_id, b"", "", None, synapse.server_name)
    early = request(proxy.url, pending.client_path("?timeout_ms=0"), headers=bearer(user_token))
    assert early.status == 504  # Synapse's answer: not uploaded yet
    put = request(
        proxy.url,
        f"/_matrix/media/v3/upload/{synapse.server_name}/{media_id}?filename=late.bin",
        method="PUT",
        headers=[*bearer(user_token), ("Content-Type", "application/octet-stream")],
        body=data[::-1],
    )
    assert put.status == 200, put.body
    answer = wait_for(
        lambda: (
            (a := request(proxy.url, pending.client_path(), headers=bearer(user_token))).status
            == 200
            and a
        )
    )
    assert answer and answer.body == data[::-1]


def test_other_routes_pass_through(synapse: Synapse, proxy: MediaProxy, user_token: str) -> None:
    for method, path in [
        ("GET", "/_matrix/client/versions"),
        ("GET", "/_matrix/client/v1/media/config"),
        ("GET", "/_matrix/media/v3/config"),
        ("OPTIONS", "/_matrix/client/v1/media/download/x/y"),
        ("GET", "/_matrix/media/v3/preview_url?url=http://example.org"),
        ("GET", "/_matrix/client/v3/account/whoami"),
        ("DELETE", "/_matrix/media/v3/upload"),
    ]:
        differential(synapse, proxy, method, path, bearer(user_token))


def test_requests_without_an_id_are_logged_with_distinct_ones(
    proxy: MediaProxy, user_token: str, uploaded: dict[str, Media]
) -> None:
    """The id the proxy makes up when a request has no X-Request-ID: 16 hex digits, never
    the same twice (a per-process prefix and a count)."""
    path = uploaded["text"].client_path(f"/no-id-{os.urandom(4).hex()}.txt")
    for _ in range(3):
        assert request(proxy.url, path, headers=bearer(user_token)).status == 200
    ids = wait_for(
        lambda: (
            found
            if len(found := [e["request_id"] for e in proxy.log_events() if e.get("path") == path])
            == 3
            else None
        )
    )
    assert len(set(ids)) == 3
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in ids)


def test_last_access_ts_is_written(
    synapse: Synapse, proxy: MediaProxy, user_token: str, uploaded: dict[str, Media]
) -> None:
    media = uploaded["text"]
    sql(
        synapse,
        "UPDATE local_media_repository SET last_access_ts = ? WHERE media_id = ?",
        1,
        media.media_id,
    )
    before = int(time.time() * 1000)
    assert request(proxy.url, media.client_path(), headers=bearer(user_token)).status == 200
    flush = float(proxy.config.get("access_flush_interval", 60))
    ts = wait_for(
        lambda: (
            (
                sql(
                    synapse,
                    "SELECT last_access_ts FROM local_media_repository WHERE media_id = ?",
                    media.media_id,
                )[0][0]
                or 0
            )
            >= before
            and True
        ),
        timeout=flush + 5,
    )
    assert ts


def test_synapse_down_gives_502_json(synapse: Synapse, tmp_path) -> None:  # type: ignore[no-untyped-def]
    dead = MediaProxy(
        tmp_path, synapse_config=synapse.config_path, synapse_url="http://127.0.0.1:9"
    )
    dead.start()
    try:
        answer = request(dead.url, "/_matrix/client/versions")
        assert answer.status == 502
        assert json.loads(answer.body)["errcode"] == "M_UNKNOWN"
        assert answer.header("content-type") == "application/json"
    finally:
        dead.stop()


def test_stale_fill_files_are_removed_at_start(synapse: Synapse, proxy: MediaProxy) -> None:
    fill_dir = synapse.media_store_path / paths.FILL_DIR
    stale = fill_dir / paths.fill_name("local_content/xx/yy/crashed")
    stale.write_bytes(b"partial")
    proxy.restart()
    assert not stale.exists()


@pytest.mark.parametrize("size", [50_000, 2 * 1024 * 1024])  # hashed on the loop; in a thread
def test_s3_object_with_other_bytes_is_never_served_whole(
    synapse: Synapse, proxy: MediaProxy, user_token: str, seaweed: SeaweedFS, size: int
) -> None:
    """Same size, other content: the sha256 check fails, the held-back last byte is never
    sent, so the client sees a broken response, not a clean wrong 200; nothing is cached."""
    media = upload(
        synapse.url,
        user_token,
        os.urandom(size),
        name="tampered.bin",
        server_name=synapse.server_name,
    )
    assert synapse.s3 is not None
    seaweed.client().put_object(
        Bucket=synapse.s3.bucket, Key=media.rel, Body=os.urandom(len(media.data))
    )
    evict(synapse, media)
    answer = request(proxy.url, media.client_path(), headers=bearer(user_token))
    assert answer.status == 200
    assert not answer.complete
    assert len(answer.body) < len(media.data)
    assert not store_file(synapse, media).exists()


def test_fills_survive_the_state_folder_being_removed(
    synapse: Synapse, proxy: MediaProxy, user_token: str
) -> None:
    media = upload(
        synapse.url,
        user_token,
        os.urandom(50_000),
        name="state.bin",
        server_name=synapse.server_name,
    )
    evict(synapse, media)
    shutil.rmtree(synapse.media_store_path / paths.STATE_DIR)
    answer = request(proxy.url, media.client_path(), headers=bearer(user_token))
    assert answer.body == media.data
    assert stored_bytes(synapse, media) == media.data  # a fill, not a pass-through


def test_upload_with_expect_100_continue(
    synapse: Synapse, proxy: MediaProxy, user_token: str
) -> None:
    """curl and browsers send `Expect: 100-continue` with big bodies: aiohttp answers the
    100 itself and the upload still streams through to Synapse."""
    data = os.urandom(300_000)
    answer = request(
        proxy.url,
        "/_matrix/media/v3/upload?filename=expect.bin",
        method="POST",
        headers=[*bearer(user_token), ("Content-Type", "image/png"), ("Expect", "100-continue")],
        body=data,
    )
    assert answer.status == 200, answer.body
    media_id = json.loads(answer.body)["content_uri"].rsplit("/", 1)[1]
    media = Media(media_id, data, "image/png", "expect.bin", synapse.server_name)
    assert request(proxy.url, media.client_path(), headers=bearer(user_token)).body == data


def _statuses(url: str, head: bytes) -> tuple[list[int], bytes]:
    """The status codes of everything answered to one raw head (interim 1xx first) and the
    final body, read to the end (the head asks to close)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        while chunk := sock.recv(65536):
            received += chunk
    statuses = []
    while received.startswith(b"HTTP/1."):
        head, _, received = received.partition(b"\r\n\r\n")
        statuses.append(int(head.split(b" ", 2)[1]))
        if statuses[-1] >= 200:
            break
    return statuses, received


@pytest.mark.parametrize(
    ("version", "expect"),
    [
        ("HTTP/1.1", "100-continue"),
        ("HTTP/1.1", "100-Continue"),
        ("HTTP/1.1", "something-else"),
        ("HTTP/1.0", "100-continue"),
    ],
)
def test_expect_header_answered_as_synapse(
    synapse: Synapse,
    proxy: MediaProxy,
    user_token: str,
    uploaded: dict[str, Media],
    version: str,
    expect: str,
) -> None:
    """Twisted sends the interim 100 for `Expect: 100-continue` on HTTP/1.1, whatever the
    request, and ignores any other expectation (aiohttp's router answered those with 417)."""
    media = uploaded["text"]
    head = (
        f"GET {media.client_path()} {version}\r\nHost: x\r\nAuthorization: Bearer {user_token}"
        f"\r\nExpect: {expect}\r\nConnection: close\r\n\r\n"
    ).encode()
    ours, theirs = _statuses(proxy.url, head), _statuses(synapse.url, head)
    assert (
        ours[0]
        == theirs[0]
        == ([100, 200] if version == "HTTP/1.1" and expect != "something-else" else [200])
    )
    assert ours[1] == theirs[1] == media.data
