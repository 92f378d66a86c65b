"""nginx/media-proxy.conf in front of the real media-proxy and the real Synapse.

Starts Debian's nginx (foreground, its own prefix and pid file, a loopback port) with the shipped
site rendered by nginx/render_test_config.py, in front of the session's `media-proxy serve`
(3 workers, fixture `proxy`) and Synapse (SQLite and PostgreSQL), with SeaweedFS as S3.

Checks that through nginx:
- downloads are answered like Synapse's own (status, headers but Server/Date/Connection, bytes),
  with the file in the store and evicted;
- routes outside the media prefixes go straight to Synapse (the proxy never sees them);
- a 50 MiB upload passes through nginx and the proxy to Synapse without being held in memory
  (the peak RSS of the proxy's processes, VmHWM after resetting it, grows by a few MiB);
- X-Accel mode (a second proxy with --accel-redirect, nginx with the snippet and the media
  store as its alias) answers hits, misses, the conditionals nginx would answer itself, and
  HEAD with the same bytes and headers as the plain mode.
"""

from __future__ import annotations

import os
import signal
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from devstack.nginx import Nginx
from devstack.proxy import MediaProxy
from devstack.synapse import Synapse
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import (
    Answer,
    Media,
    bearer,
    evict,
    request,
    stored_bytes,
    upload,
)

pytestmark = pytest.mark.integration

ACCEL_LOCATION = "/_media_proxy_cache/"
# Besides Server and Date (media.IGNORED), nginx adds "Connection: keep-alive"; Synapse sends
# no Connection header and aiohttp sends none on a keep-alive answer.
NGINX_OWN = frozenset({"connection"})
MiB = 1024 * 1024


def comparable(answer: Answer) -> tuple[int, list[tuple[str, str]], str, bool]:
    headers = [(k, v) for k, v in answer.headers if k not in NGINX_OWN]
    return replace(answer, headers=headers).comparable()


def address(url: str) -> str:
    return url.removeprefix("http://")


class ProxyLog:
    """The proxy's `request` events for this test's own requests.

    Each request the test sends through nginx carries `X-Request-ID: <tag>-<n>` (nginx
    passes a client's id on), so a late event of another test's request can never enter the
    window, and waits end when the test's own events are there, not after some time.
    """

    def __init__(self, proxy: MediaProxy) -> None:
        self.proxy = proxy
        self.tag = uuid.uuid4().hex[:12]
        self.sent = 0

    def headers(self, headers: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
        """`headers` plus a request id of this window's."""
        self.sent += 1
        return [*(headers or []), ("X-Request-ID", f"{self.tag}-{self.sent}")]

    def events(self) -> list[dict[str, Any]]:
        return [
            e
            for e in self.proxy.log_events()
            if e.get("event") == "request" and str(e.get("request_id")).startswith(self.tag)
        ]

    def wait(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """The events once `count` of them are there: a worker logs a request just after
        its answer went out."""
        deadline = time.monotonic() + timeout
        while len(events := self.events()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return events

    def until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """The events once `done` says they are all there (or as they are at the timeout)."""
        deadline = time.monotonic() + timeout
        while not done(events := self.events()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return events

    def sources(self, media_id: str) -> list[str]:
        """Sources of all requests sent so far with this window's ids, for one media."""
        return [str(e["source"]) for e in self.wait(self.sent) if e.get("media_id") == media_id]


# ---------------------------------------------------------------------------------------------
# Fixtures


def _nginx(
    name: str, synapse: Synapse, proxy: MediaProxy, tmp: pytest.TempPathFactory, **extra: Any
) -> Iterator[Nginx]:
    server = Nginx(
        tmp.mktemp(f"{name}-{synapse.server_name}"),
        media_proxy=[address(proxy.url)],
        synapse=address(synapse.url),
        server_name=synapse.server_name,
        client_max_body_size=str(synapse.config["max_upload_size"]),
        **extra,
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nginx(
    synapse: Synapse, proxy: MediaProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    yield from _nginx("nginx", synapse, proxy, tmp_path_factory)


@pytest.fixture(scope="module")
def accel_proxy(synapse: Synapse, s3_proxy: FaultProxy, devstack_dir: Path) -> Iterator[MediaProxy]:
    media_proxy = MediaProxy(
        devstack_dir / f"media-proxy-accel-{synapse.server_name}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        workers=2,
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
        extra_args=["--accel-redirect", ACCEL_LOCATION],
    ).start()
    try:
        yield media_proxy
    finally:
        media_proxy.stop()


@pytest.fixture(scope="module")
def accel_nginx(
    synapse: Synapse, accel_proxy: MediaProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    yield from _nginx(
        "nginx-accel", synapse, accel_proxy, tmp_path_factory, accel_root=synapse.media_store_path
    )


@pytest.fixture(scope="module")
def media(synapse: Synapse, user_token: str) -> dict[str, Media]:
    sn = synapse.server_name

    def up(data: bytes, content_type: str, name: str | None) -> Media:
        return upload(
            synapse.url, user_token, data, content_type=content_type, name=name, server_name=sn
        )

    return {
        "png": up(b"\x89PNG\r\n\x1a\n" + os.urandom(30_000), "image/png", "cat.png"),
        "html": up(b"<script>alert(1)</script>" * 50, "text/html", "page.html"),
        "text": up(b"hello " * 500, "text/plain; charset=latin1", None),
        "svg": up(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "\u00e9.svg"),
        "video": up(os.urandom(6 * MiB + 123), "video/mp4", "clip.mp4"),
    }


def download_cases(m: Media, token: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    auth = bearer(token)
    out: list[tuple[str, str, list[tuple[str, str]]]] = []
    for method in ("GET", "HEAD"):
        out += [
            (method, m.client_path(), auth),
            (method, m.client_path("/other%20name.bin"), auth),
            (method, m.client_path(f"?access_token={token}"), []),
            (method, m.legacy_path("v3"), []),
            (method, m.legacy_path("r0", "/x.bin"), []),
        ]
    out += [
        ("GET", m.client_path(), [*auth, ("If-None-Match", "1")]),
        ("GET", m.client_path(), []),
        ("GET", m.client_path(), bearer("not-a-token")),
        ("GET", m.client_path(), [*auth, ("Range", "bytes=0-9,20-29")]),  # several: whole
        ("GET", m.client_path(), [*auth, ("If-Match", '"nope"')]),
        ("GET", m.client_path(), [*auth, ("If-Unmodified-Since", "Mon, 01 Jan 2001 00:00:00 GMT")]),
        ("GET", m.client_path(), [*auth, ("If-None-Match", "*")]),
        ("GET", m.client_path(), [*auth, ("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")]),
    ]
    return out


# ---------------------------------------------------------------------------------------------
# Plain mode


@pytest.mark.parametrize("evicted", [False, True], ids=["in-store", "evicted"])
@pytest.mark.parametrize("kind", ["png", "html", "text", "svg", "video"])
def test_downloads_through_nginx_match_synapse(
    synapse: Synapse,
    proxy: MediaProxy,
    nginx: Nginx,
    user_token: str,
    media: dict[str, Media],
    kind: str,
    evicted: bool,
) -> None:
    m = media[kind]
    log = ProxyLog(proxy)
    for method, path, headers in download_cases(m, user_token):
        if evicted:
            evict(synapse, m)
        ours = request(nginx.url, path, method=method, headers=log.headers(headers))
        if evicted:
            evict(synapse, m)
        theirs = request(synapse.url, path, method=method, headers=headers)
        assert comparable(ours) == comparable(theirs), (method, path, headers, ours, theirs)
    # The proxy answered them (nginx did not route around it), from the store or from S3.
    sources = log.sources(m.media_id)
    assert ("s3" if evicted else "cache") in sources, sources
    evict(synapse, m)
    answer = request(nginx.url, m.client_path(), headers=bearer(user_token))
    assert answer.body == m.data
    assert stored_bytes(synapse, m) == m.data  # written back


def test_other_routes_go_straight_to_synapse(
    synapse: Synapse, proxy: MediaProxy, nginx: Nginx, user_token: str
) -> None:
    log = ProxyLog(proxy)
    for method, path in [
        ("GET", "/_matrix/client/versions"),
        ("GET", "/_matrix/client/v3/account/whoami"),
        ("GET", "/_synapse/admin/v1/server_version"),
        ("GET", "/_matrix/key/v2/server"),
        ("GET", "/.well-known/matrix/client"),
        ("POST", "/_matrix/client/v3/logout/nothing"),
    ]:
        ours = request(nginx.url, path, method=method, headers=log.headers(bearer(user_token)))
        theirs = request(synapse.url, path, method=method, headers=bearer(user_token))
        if path == "/_matrix/key/v2/server":  # signed with a fresh valid_until_ts each time
            assert ours.status == theirs.status == 200
            continue
        assert comparable(ours) == comparable(theirs), (path, ours, theirs)
    skipped = log.sent

    # The rest of the media prefixes goes to the proxy, which passes it on to Synapse; their
    # events also mark the point by which any of the six above would have been logged.
    for path in ("/_matrix/client/v1/media/config", "/_matrix/media/v3/config"):
        ours = request(nginx.url, path, headers=log.headers(bearer(user_token)))
        theirs = request(synapse.url, path, headers=bearer(user_token))
        assert comparable(ours) == comparable(theirs), (path, ours, theirs)
    events = log.wait(2)
    assert [e["source"] for e in events] == ["synapse", "synapse"]
    # none of the six went through the proxy
    assert [e["request_id"] for e in events] == [f"{log.tag}-{skipped + i}" for i in (1, 2)]


def proxy_pids(proxy: MediaProxy) -> list[int]:
    assert proxy.process is not None
    pid = proxy.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_50mib_upload_is_streamed_not_buffered(
    synapse: Synapse, proxy: MediaProxy, nginx: Nginx, user_token: str
) -> None:
    data = os.urandom(50 * MiB)
    pids = proxy_pids(proxy)
    before: dict[int, int] = {}
    for pid in pids:
        # "5" resets VmHWM (peak RSS) to the current RSS, so VmHWM afterwards is the peak
        # during the upload, however briefly a buffer lived (a before/after RSS would miss it).
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        before[pid] = status_kib(pid, "VmRSS")
    log = ProxyLog(proxy)

    m = upload(
        nginx.url,
        user_token,
        data,
        name="big.bin",
        server_name=synapse.server_name,
        headers=log.headers(),
    )

    growth = {pid: status_kib(pid, "VmHWM") - before[pid] for pid in pids}
    print(f"proxy processes' peak RSS growth during a 50 MiB upload (KiB): {growth}")
    uploads = [e for e in log.wait(1) if e["path"] == "/_matrix/media/v3/upload"]
    assert [e["source"] for e in uploads] == ["synapse"]  # through the proxy, to Synapse
    # Buffered, one process would grow by >= 50 MiB; streamed, by a few socket buffers.
    assert max(growth.values()) < 12 * 1024, growth
    assert sum(growth.values()) < 16 * 1024, growth
    # nginx did not spool it to disk either (proxy_request_buffering off).
    spool = nginx.prefix / "temp" / "client_body"
    assert not spool.exists() or not any(spool.rglob("*"))
    # Synapse stored exactly those bytes.
    assert stored_bytes(synapse, m) == data
    answer = request(nginx.url, m.client_path(), headers=bearer(user_token))
    assert answer.status == 200 and answer.sha256 == Answer(200, [], data).sha256


# ---------------------------------------------------------------------------------------------
# X-Accel mode


def test_accel_nginx_workers_read_a_private_store(synapse: Synapse, accel_nginx: Nginx) -> None:
    """pytest's temporary dirs are 0700: nginx's workers can send files from them only as
    the store's owner (the renderer adds `user root;` when started as root)."""
    private = [
        p
        for p in (synapse.media_store_path, *synapse.media_store_path.parents)
        if stat.S_IMODE(p.stat().st_mode) & 0o005 == 0
    ]
    assert private, "the store is world-readable: this test checks nothing"
    for pid in accel_nginx.worker_pids():
        uids = next(
            line.split()[1:]
            for line in Path(f"/proc/{pid}/status").read_text().splitlines()
            if line.startswith("Uid:")
        )
        assert {int(u) for u in uids} == {os.geteuid()}


def _answers_like_plain_mode(
    synapse: Synapse,
    nginx: Nginx,
    front: Nginx,
    log: ProxyLog,
    m: Media,
    cases: list[tuple[str, str, list[tuple[str, str]]]],
    token: str,
    evicted: bool,
) -> list[tuple[str, str, list[tuple[str, str]], Answer]]:
    """Each case through `front` answered as through the plain-mode `nginx` (the file put
    back first; evicted before each request if `evicted`); returns the cases with the
    answers of `front`."""
    request(nginx.url, m.client_path(), headers=bearer(token))
    assert stored_bytes(synapse, m) == m.data  # in the store again
    answers = []
    for method, path, headers in cases:
        if evicted:
            evict(synapse, m)
        ours = request(front.url, path, method=method, headers=log.headers(headers))
        if evicted:
            evict(synapse, m)
        plain = request(nginx.url, path, method=method, headers=headers)
        assert comparable(ours) == comparable(plain), (method, path, headers, ours, plain)
        assert ours.header("x-accel-redirect") is None
        answers.append((method, path, headers, ours))
    return answers


@pytest.mark.parametrize("evicted", [False, True], ids=["hit", "miss"])
@pytest.mark.parametrize("kind", ["png", "html", "text", "svg", "video"])
def test_accel_mode_answers_like_plain_mode(
    synapse: Synapse,
    nginx: Nginx,
    accel_nginx: Nginx,
    accel_proxy: MediaProxy,
    user_token: str,
    media: dict[str, Media],
    kind: str,
    evicted: bool,
) -> None:
    m = media[kind]
    log = ProxyLog(accel_proxy)
    for method, path, headers, accel in _answers_like_plain_mode(
        synapse, nginx, accel_nginx, log, m, download_cases(m, user_token), user_token, evicted
    ):
        if evicted:
            evict(synapse, m)
        theirs = request(synapse.url, path, method=method, headers=headers)
        assert comparable(accel) == comparable(theirs), (method, path, headers, accel, theirs)

    sources = log.sources(m.media_id)
    if evicted:
        # Misses are streamed by the proxy itself, never redirected.
        assert "s3" in sources and "cache-accel" not in sources, sources
    else:
        # Hits are handed to nginx, except the conditionals nginx would answer itself
        # (If-Match, If-Unmodified-Since, If-None-Match: *) and Range, which the proxy sends.
        assert sources.count("cache") == 4, sources
        assert "cache-accel" in sources and "s3" not in sources, sources


def test_accel_client_cannot_reach_the_internal_location(
    synapse: Synapse, accel_nginx: Nginx, media: dict[str, Media]
) -> None:
    m = media["png"]
    answer = request(accel_nginx.url, ACCEL_LOCATION + m.rel)
    assert answer.status == 404
    assert m.data not in answer.body


# ---------------------------------------------------------------------------------------------
# Fast-hit mode: nginx asks the proxy once, then sends hits alone for 5 s


@pytest.fixture(scope="module")
def fast_nginx(
    synapse: Synapse, accel_proxy: MediaProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Nginx]:
    yield from _nginx(
        "nginx-fast",
        synapse,
        accel_proxy,
        tmp_path_factory,
        accel_root=synapse.media_store_path,
        fast_hits=True,
    )


def thumbnail_cases(m: Media, token: str) -> list[tuple[str, str, list[tuple[str, str]]]]:
    query = "?width=32&height=32&method=scale"
    return [
        ("GET", f"/_matrix/client/v1/media/thumbnail/{m.server_name}/{m.media_id}{query}", []),
        (
            "GET",
            f"/_matrix/client/v1/media/thumbnail/{m.server_name}/{m.media_id}{query}",
            bearer(token),
        ),
        ("HEAD", f"/_matrix/media/v3/thumbnail/{m.server_name}/{m.media_id}{query}", []),
    ]


@pytest.mark.parametrize("evicted", [False, True], ids=["hit", "miss"])
@pytest.mark.parametrize("kind", ["png", "html", "text", "svg", "video"])
def test_fast_mode_answers_like_plain_mode(
    synapse: Synapse,
    nginx: Nginx,
    fast_nginx: Nginx,
    accel_proxy: MediaProxy,
    user_token: str,
    media: dict[str, Media],
    kind: str,
    evicted: bool,
) -> None:
    m = media[kind]
    cases = download_cases(m, user_token)
    if kind == "png":
        cases += thumbnail_cases(m, user_token)
    log = ProxyLog(accel_proxy)
    # twice: the second round meets nginx's cached yeses
    _answers_like_plain_mode(synapse, nginx, fast_nginx, log, m, cases * 2, user_token, evicted)
    wanted = "s3" if evicted else "cache-accel"
    events = log.until(lambda found: wanted in [e["source"] for e in found])
    events = [e for e in events if e.get("media_id") == m.media_id]
    decided = [e for e in events if e.get("decide")]
    if evicted:
        # every question was a no (the file was never there when asked), and the client's
        # own request then went to the proxy, which streamed the file from S3
        assert decided and {(e["status"], e["source"]) for e in decided} == {(204, "proxy")}
        assert "s3" in [e["source"] for e in events if not e.get("decide")]
    else:
        assert "cache-accel" in [e["source"] for e in decided], decided


def test_fast_hits_are_sent_by_nginx_alone_and_refusals_by_the_proxy(
    synapse: Synapse, user_token: str, s3_proxy: FaultProxy, tmp_path: Path
) -> None:
    """After a yes, nginx answers the same request without the proxy: it answers even while
    the proxy is frozen (SIGSTOP). Another token, a bad one, a file evicted meanwhile: the
    proxy's answers, as in plain mode."""
    m = upload(
        synapse.url,
        user_token,
        os.urandom(200_000),
        name="fast.bin",
        server_name=synapse.server_name,
    )
    proxy = MediaProxy(
        tmp_path / "proxy",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
        extra_args=["--accel-redirect", ACCEL_LOCATION],
    ).start()
    try:
        fast = Nginx(
            tmp_path / "nginx",
            media_proxy=[address(proxy.url)],
            synapse=address(synapse.url),
            server_name=synapse.server_name,
            accel_root=synapse.media_store_path,
            fast_hits=True,
        ).start()
        try:
            _check_fast_hits(synapse, proxy, fast, m, user_token)
        finally:
            fast.stop()
    finally:
        proxy.stop()


def _check_fast_hits(
    synapse: Synapse, proxy: MediaProxy, fast: Nginx, m: Media, token: str
) -> None:
    assert proxy.process is not None
    log = ProxyLog(proxy)
    for _ in range(3):  # the yes is kept 5 s: a pair of requests further apart tries again
        first = request(fast.url, m.client_path(), headers=log.headers(bearer(token)))
        asked = time.monotonic()
        assert first.status == 200 and first.body == m.data
        os.kill(proxy.process.pid, signal.SIGSTOP)
        try:
            if time.monotonic() - asked > 3:
                continue
            second = request(fast.url, m.client_path(), headers=bearer(token), timeout=2)
        finally:
            os.kill(proxy.process.pid, signal.SIGCONT)
        break
    else:
        pytest.fail("no two requests within 3 s")
    assert (second.status, second.body) == (200, m.data)
    assert comparable(second) == comparable(first)
    event = log.wait(1)[0]
    assert (event["source"], event.get("decide")) == ("cache-accel", True)

    # a token the proxy refuses, with the same path: the proxy's own 401, as in plain mode
    denied = request(fast.url, m.client_path(), headers=log.headers(bearer("not-a-token")))
    theirs = request(synapse.url, m.client_path(), headers=bearer("not-a-token"))
    assert comparable(denied) == comparable(theirs)

    # a file evicted after nginx sent it: every answer stays the file's bytes (nginx sends
    # them from the descriptor it keeps open, `open_file_cache`, until it checks the file
    # again), and once nginx finds the file gone the request goes to the proxy, which fills it
    request(fast.url, m.client_path(), headers=bearer(token))
    evict(synapse, m)

    def filled(events: list[dict[str, Any]]) -> bool:
        return any(e["source"] == "s3" and e.get("media_id") == m.media_id for e in events)

    deadline = time.monotonic() + 30  # nginx checks an open file again every 5 s
    while not filled(log.events()):
        assert time.monotonic() < deadline, "nginx never found the evicted file gone"
        again = request(fast.url, m.client_path(), headers=log.headers(bearer(token)))
        assert (again.status, again.body) == (200, m.data)
        time.sleep(0.1)
    assert stored_bytes(synapse, m) == m.data
