"""Operations: Prometheus metrics summed across workers, and `/_media_proxy/ready`.

Starts `media-proxy serve --workers 3 --metrics-listen 127.0.0.1:<port>` in front of each test
Synapse, with S3 behind the fault proxy (`s3_faults`) so its GETs can be counted and S3 taken
down. Every count is checked exactly against what the test did: the proxy's own `request`
events (keyed to the test's request ids; the metrics are recorded before each event is
logged) and the fault proxy's record of S3 GETs. A second proxy with a closed Synapse port,
and nginx rendered from the shipped config, cover readiness and the metrics listener's
privacy.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.nginx import Nginx
from devstack.procs import LOOPBACK, free_port
from devstack.proxy import MediaProxy
from devstack.synapse import Synapse
from media_proxy import metrics
from media_proxy.config import ConfigError, load
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

READY = "/_media_proxy/ready"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Metered:
    """A media-proxy with its metrics listener."""

    def __init__(self, server: MediaProxy, metrics_port: int) -> None:
        self.server, self.metrics_port = server, metrics_port
        self.metrics_url = f"http://{LOOPBACK}:{metrics_port}"

    def scrape(self) -> Samples:
        answer = request(self.metrics_url, "/metrics")
        assert answer.status == 200, answer.body[:300]
        assert (answer.header("content-type") or "").startswith("text/plain")
        out: Samples = {}
        for family in text_string_to_metric_families(answer.body.decode()):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


@pytest.fixture(scope="module")
def metered(synapse: Synapse, s3_proxy: FaultProxy, devstack_dir: Path) -> Iterator[Metered]:
    port = free_port()
    server = MediaProxy(
        devstack_dir / f"metrics-{synapse.server_name}-{uuid.uuid4().hex[:6]}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        workers=3,
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
        extra_args=["--metrics-listen", f"{LOOPBACK}:{port}"],
    ).start()
    try:
        yield Metered(server, port)
    finally:
        server.stop()


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def by_labels(samples: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = collections.defaultdict(float)
    for (n, ls), v in samples.items():
        if n == name:
            d = dict(ls)
            out[tuple(d[k] for k in keys)] += v
    return out


def delta(before: Samples, after: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    a, b = by_labels(after, name, *keys), by_labels(before, name, *keys)
    return {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0)}


def wait_for(check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def request_events(server: MediaProxy, rids: list[str]) -> dict[str, dict[str, Any]]:
    """The `request` events for our request ids (waited for: each is logged after its answer)."""

    def find() -> dict[str, dict[str, Any]] | None:
        found = {
            e["request_id"]: e
            for e in server.log_events()
            if e.get("event") == "request" and e.get("request_id") in rids
        }
        return found if len(found) == len(rids) else None

    events = wait_for(find)
    assert events is not None, f"request events missing among {rids}"
    return events


def new_media(synapse: Synapse, token: str, size: int, name: str) -> Media:
    return upload(synapse.url, token, os.urandom(size), name=name, server_name=synapse.server_name)


def get(server: MediaProxy, media: Media, token: str, rid: str) -> Answer:
    return request(server.url, media.client_path(), headers=[*bearer(token), ("X-Request-ID", rid)])


def object_gets(s3: FaultProxy, media: Media | None = None) -> int:
    """GetObject requests S3 saw (ListObjectsV2 is a GET too: not counted)."""
    return sum(
        1
        for r in s3.requests
        if r.method == "GET"
        and "list-type" not in r.path
        and (media is None or media.rel in r.path)
    )


def hang_up(server: MediaProxy, media: Media, token: str, rid: str) -> None:
    """Read the head of a big download, then reset the connection."""
    with socket.create_connection((LOOPBACK, server.port), timeout=20) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(
            f"GET {media.client_path()} HTTP/1.1\r\nHost: x\r\nX-Request-ID: {rid}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n".encode()
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- counters -------------------------------------------------------------------------------


def test_counters_sum_exactly_across_workers(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, metered: Metered
) -> None:
    server = metered.server
    hit = new_media(synapse, user_token, 20_000, "m-hit.bin")
    miss = new_media(synapse, user_token, 300_000, "m-miss.bin")
    big = new_media(synapse, user_token, 32 * 1024 * 1024, "m-big.bin")
    evict(synapse, miss)
    tag = uuid.uuid4().hex[:8]
    before = metered.scrape()
    s3_faults.reset()

    rids: list[str] = []
    for i in range(6):
        rids.append(f"{tag}-hit-{i}")
        answer = get(server, hit, user_token, rids[-1])
        assert answer.status == 200 and answer.body == hit.data
    for i in range(3):  # the first from S3, then from the store it refilled
        rids.append(f"{tag}-miss-{i}")
        answer = get(server, miss, user_token, rids[-1])
        assert answer.status == 200 and answer.body == miss.data
        # the fill renames its file into place just after the verified last byte
        assert stored_bytes(synapse, miss) == miss.data
    rids.append(f"{tag}-denied")
    denied = get(server, hit, "not-a-token", rids[-1])
    assert denied.status == 401
    rids.append(f"{tag}-synapse")
    versions = request(server.url, "/_matrix/client/versions", headers=[("X-Request-ID", rids[-1])])
    assert versions.status == 200
    rids.append(f"{tag}-hangup")
    hang_up(server, big, user_token, rids[-1])

    events = request_events(server, rids)
    after = metered.scrape()

    # what the events say, and what the test knows independently of them
    assert events[f"{tag}-miss-0"]["source"] == "s3"
    assert {events[r]["source"] for r in rids if "-hit-" in r} == {"cache"}
    assert events[f"{tag}-synapse"]["source"] == "synapse"
    assert events[f"{tag}-hangup"]["aborted"] == "client"
    expected_requests = collections.Counter(
        (e["route"], e["source"], str(e["status"])) for e in events.values()
    )
    expected_bytes = collections.Counter[str]()
    for e in events.values():
        expected_bytes[e["source"]] += e["bytes"] or 0

    assert delta(before, after, "media_proxy_requests_total", "kind", "source", "status") == {
        k: float(n) for k, n in expected_requests.items()
    }
    assert delta(before, after, "media_proxy_sent_bytes_total", "source") == {
        (s,): float(n) for s, n in expected_bytes.items() if n
    }
    assert delta(before, after, "media_proxy_sent_bytes_total", "source")[("cache",)] >= 6 * len(
        hit.data
    ) + 2 * len(miss.data)
    assert delta(before, after, "media_proxy_responses_aborted_total", "cause") == {("client",): 1}
    assert delta(before, after, "media_proxy_request_duration_seconds_count", "source") == {
        (s,): float(n) for s, n in collections.Counter(e["source"] for e in events.values()).items()
    }
    # one S3 GET: the miss; the proxy's count and S3's agree
    assert object_gets(s3_faults) == 1
    assert delta(before, after, "media_proxy_s3_requests_total", "method", "outcome") == {
        ("GetObject", "ok"): 1
    }
    assert delta(before, after, "media_proxy_s3_request_duration_seconds_count", "method") == {
        ("GetObject",): 1
    }
    assert delta(before, after, "media_proxy_fills_started_total") == {(): 1}
    # S3 connections the workers opened (none when the miss's worker kept one from earlier)
    opened = "media_proxy_s3_connections_opened_total"
    assert total(after, opened) - total(before, opened) == s3_faults.connections
    # every authenticated download asked the auth cache once, and the media row cache once
    # the token was good
    downloads = sum(1 for r in rids if "-hit-" in r or "-miss-" in r or "hangup" in r)
    auth = delta(before, after, "media_proxy_cache_lookups_total", "cache", "result")
    assert auth.get(("auth", "hit"), 0) + auth.get(("auth", "miss"), 0) == downloads + 1
    assert auth.get(("auth", "miss"), 0) >= 1
    rows = auth.get(("local_media", "hit"), 0) + auth.get(("local_media", "miss"), 0)
    assert rows == downloads


def test_clients_joining_a_running_fill_are_counted(
    synapse: Synapse, user_token: str, s3_faults: FaultProxy, metered: Metered
) -> None:
    """A fill held mid-body by S3: it is in flight (summed over live workers) until S3 goes
    on; a second client joins it (in its worker, or following another worker) and S3 is
    asked once."""
    server = metered.server
    media = new_media(synapse, user_token, 3 * 1024 * 1024, "m-join.bin")
    evict(synapse, media)
    tag = uuid.uuid4().hex[:8]
    before = metered.scrape()
    s3_faults.reset()
    s3_faults.stall_after(1024 * 1024, match=lambda m, p: m == "GET" and media.rel in p, times=1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(get, server, media, user_token, f"{tag}-lead")
        s3_faults.wait_stalled(1)
        assert total(metered.scrape(), "media_proxy_fills_in_flight") == 1
        second = pool.submit(get, server, media, user_token, f"{tag}-join")

        def joined() -> bool:
            d = delta(before, metered.scrape(), "media_proxy_fills_joined_total", "leader")
            return sum(d.values()) == 1

        assert wait_for(joined)
        s3_faults.clear_faults()
        answers = [first.result(timeout=30), second.result(timeout=30)]
    assert all(a.status == 200 and a.body == media.data for a in answers)
    request_events(server, [f"{tag}-lead", f"{tag}-join"])
    after = metered.scrape()
    assert object_gets(s3_faults, media) == 1
    assert delta(before, after, "media_proxy_fills_started_total") == {(): 1}
    assert sum(delta(before, after, "media_proxy_fills_joined_total", "leader").values()) == 1
    # the leader's worker drops its count right after releasing the fill's lock
    assert wait_for(lambda: total(metered.scrape(), "media_proxy_fills_in_flight") == 0)
    assert delta(before, after, "media_proxy_s3_requests_total", "method", "outcome") == {
        ("GetObject", "ok"): 1
    }


def test_evictions_and_store_size(
    synapse: Synapse, user_token: str, s3_proxy: FaultProxy, devstack_dir: Path, tmp_path: Path
) -> None:
    """The background evictor's deletions are counted as its `cache_evict.pass` events say,
    and the store's size is the gauge (a cache of the test's own: budget 0 empties it)."""
    port = free_port()
    server = MediaProxy(
        devstack_dir / f"metrics-evict-{uuid.uuid4().hex[:6]}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        workers=2,
        config={
            **TEST_PROXY_CONFIG,
            "s3": {"endpoint_url": s3_proxy.url},
            "cache_path": str(tmp_path / "cache"),
            "cache_max_size": 0,
            "cache_min_age": 0,
            "cache_evict_interval": 0.3,
        },
        extra_args=["--metrics-listen", f"{LOOPBACK}:{port}"],
    ).start()
    try:
        metered = Metered(server, port)
        media = [new_media(synapse, user_token, 100_000 + i, f"m-evict{i}.bin") for i in range(3)]
        for i, m in enumerate(media):
            assert get(server, m, user_token, f"evict-{i}").body == m.data  # filled into cache

        def passes() -> list[dict[str, Any]] | None:
            found = [e for e in server.log_events() if e.get("event") == "cache_evict.pass"]
            return found if sum(e["files"] for e in found) == len(media) else None

        events = wait_for(passes)
        assert events, "the evictor did not evict the three files"
        after = metered.scrape()
        assert total(after, "media_proxy_evicted_files_total") == len(media)
        assert total(after, "media_proxy_evicted_bytes_total") == sum(len(m.data) for m in media)
        assert sum(e["bytes"] for e in events) == sum(len(m.data) for m in media)
        assert wait_for(lambda: total(metered.scrape(), "media_proxy_store_bytes") == 0)
        assert ("media_proxy_store_bytes", frozenset()) in metered.scrape()
        assert total(metered.scrape(), "media_proxy_evictor_walk_seconds") > 0
    finally:
        server.stop()


# --- readiness ------------------------------------------------------------------------------


def ready(server: MediaProxy) -> tuple[int, dict[str, Any]]:
    answer = request(server.url, READY)
    assert answer.header("content-type") == "application/json; charset=utf-8"
    return answer.status, json.loads(answer.body)


def test_ready_names_s3_when_it_is_down(s3_faults: FaultProxy, metered: Metered) -> None:
    status, body = ready(metered.server)
    assert status == 200, body
    assert body["ready"] is True and body["s3_breaker"] == "closed"
    for part in ("s3", "database", "synapse"):
        assert body[part]["ok"] is True and isinstance(body[part]["ms"], int), body
    s3_faults.set_down(True)
    # each worker keeps its answer a moment (a load balancer's polling must not hammer S3)
    down = wait_for(lambda: (a := ready(metered.server))[0] == 503 and a)
    assert down, "the proxy stayed ready with S3 down"
    body = down[1]
    assert body["ready"] is False and body["s3"]["ok"] is False and body["s3"]["error"]
    assert body["database"]["ok"] is True and body["synapse"]["ok"] is True
    s3_faults.set_down(False)
    assert wait_for(lambda: ready(metered.server)[0] == 200)


def test_ready_names_synapse_when_it_is_unreachable(
    synapse: Synapse, s3_proxy: FaultProxy, devstack_dir: Path
) -> None:
    closed = free_port()
    server = MediaProxy(
        devstack_dir / f"metrics-nosynapse-{uuid.uuid4().hex[:6]}",
        synapse_config=synapse.config_path,
        synapse_url=f"http://{LOOPBACK}:{closed}",
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
    ).start()
    try:
        assert request(server.url, "/_media_proxy/health").status == 200  # alive all the same
        status, body = ready(server)
        assert status == 503, body
        assert body["synapse"]["ok"] is False and body["synapse"]["error"]
        assert body["s3"]["ok"] is True and body["database"]["ok"] is True
    finally:
        server.stop()


async def test_ready_answers_are_kept_a_moment_and_shared() -> None:
    """A load balancer's polling costs each dependency one probe per READY_CACHE_S; asks that
    arrive during a round of probes share it. (Probes here are counters: the real ones are
    exercised above.)"""
    calls: collections.Counter[str] = collections.Counter()
    gate = asyncio.Event()
    now = [100.0]

    def probe(name: str, *, fail: bool = False) -> metrics.Probe:
        async def run() -> None:
            calls[name] += 1
            await gate.wait()
            if fail:
                raise RuntimeError(f"{name} is down")

        return run

    readiness = metrics.Readiness(
        {"s3": probe("s3", fail=True), "database": probe("database")},
        lambda: {"s3_breaker": "closed"},
        clock=lambda: now[0],
    )
    asks = [asyncio.ensure_future(readiness.check()) for _ in range(5)]
    await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.gather(*asks)
    assert calls == {"s3": 1, "database": 1}
    ready, body = answers[0]
    assert not ready and all(a == answers[0] for a in answers)
    assert body["s3"]["ok"] is False and body["s3"]["error"] == "s3 is down"
    assert body["database"]["ok"] is True and body["s3_breaker"] == "closed"
    now[0] += metrics.READY_CACHE_S - 0.1
    assert (await readiness.check())[1] is body and calls["s3"] == 1
    now[0] += 0.2
    await readiness.check()
    assert calls == {"s3": 2, "database": 2}


# --- the listener ---------------------------------------------------------------------------


def test_metrics_listener_is_not_reachable_through_the_shipped_nginx(
    synapse: Synapse, metered: Metered, tmp_path: Path
) -> None:
    """nginx (nginx/media-proxy.conf, rendered as for production) sends the media prefixes
    to the proxy's main port and everything else to Synapse: no path reaches /metrics."""
    assert "media_proxy_requests_total" in request(metered.metrics_url, "/metrics").body.decode()
    assert request(metered.server.url, "/metrics").status != 200  # not on the main port
    nginx = Nginx(
        tmp_path / "nginx",
        media_proxy=[metered.server.url.removeprefix("http://")],
        synapse=synapse.url.removeprefix("http://"),
        server_name=synapse.server_name,
    ).start()
    try:
        rendered = "\n".join(p.read_text() for p in (tmp_path / "nginx").rglob("*.conf"))
        assert f":{metered.metrics_port}" not in rendered
        for path in (
            "/metrics",
            "/_matrix/media/v3/metrics",
            "/_matrix/client/v1/media/metrics",
            "/_matrix/media/v3/download/../../metrics",
            "/_synapse/metrics",
        ):
            answer = request(nginx.url, path)
            assert b"media_proxy_" not in answer.body, path
    finally:
        nginx.stop()


def test_metrics_listen_is_checked_like_listen(synapse: Synapse) -> None:
    def with_flag(value: str) -> Any:
        return load(
            synapse_config=[synapse.config_path],
            overrides={
                "synapse_url": synapse.url,
                "metrics_listen": value,
                "listen": "127.0.0.1:8011",
            },
        )

    assert with_flag("127.0.0.1:9101").metrics_listen == ("127.0.0.1", 9101)
    assert (
        load(
            synapse_config=[synapse.config_path], overrides={"synapse_url": synapse.url}
        ).metrics_listen
        is None
    )
    for bad, problem in ((":9101", "with a host"), ("127.0.0.1:8011", "must differ")):
        with pytest.raises(ConfigError) as e:
            with_flag(bad)
        assert "--metrics-listen" in str(e.value) and problem in str(e.value)
