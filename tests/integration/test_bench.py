"""`media-proxy bench` against the real stack: the session's media-proxy (3 workers, S3 through
the fault proxy, which counts its GETs), Synapse (SQLite and PostgreSQL) and SeaweedFS.

Each run's requests carry `X-Request-ID: <prefix>-<n>`; the proxy logs that id with every
request, so the bench's counts are checked against the proxy's own log, request by request,
with no timing involved. No test asserts a speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from devstack.procs import LOOPBACK, free_port
from devstack.proxy import MediaProxy
from devstack.samples import png
from devstack.synapse import Synapse
from media_proxy import bench, cli
from media_proxy.config import load
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Media, settle_fills, upload

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def files(synapse: Synapse, user_token: str) -> list[Media]:
    """Three small files of different kinds, uploaded through Synapse (so S3 holds them)."""
    out = []
    for i, (content_type, size) in enumerate(
        [("application/octet-stream", 1024), ("video/mp4", 300_000), ("text/plain", 20_000)]
    ):
        data = bytes((i * 7 + n) % 251 for n in range(size))
        out.append(
            upload(
                synapse.url,
                user_token,
                data,
                content_type=content_type,
                name=f"bench{i}",
                server_name=synapse.server_name,
            )
        )
    return out


def uris_file(tmp_path: Path, files: list[Media]) -> Path:
    path = tmp_path / "uris.txt"
    path.write_text("".join(f"mxc://{m.server_name}/{m.media_id}\n" for m in files))
    return path


def request_events(proxy: MediaProxy, prefix: str) -> list[dict[str, Any]]:
    """The proxy's `request` events whose request id starts with `prefix-`.

    Read with raw_decode: under load, two workers' events can share a line (a worker writes
    an event and its newline with two write calls), which must not hide a request."""
    decoder = json.JSONDecoder()
    events = []
    for line in proxy.log_path.read_text().splitlines():
        at = 0
        while at < len(line) and line[at] == "{":
            try:
                event, at = decoder.raw_decode(line, at)
            except ValueError:
                break
            if event.get("event") == "request" and str(event.get("request_id")).startswith(
                prefix + "-"
            ):
                events.append(event)
    return events


def logged(proxy: MediaProxy, prefix: str, count: int) -> list[dict[str, Any]]:
    """The run's request events, once all `count` are there (a worker logs a request just
    after its answer went out, so the last ones may trail the bench by a hair)."""
    deadline = time.monotonic() + 10
    while True:
        events = request_events(proxy, prefix)
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = cli.main(["bench", *args, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_hits_agree_with_the_proxys_log(
    synapse: Synapse,
    proxy: MediaProxy,
    user_token: str,
    files: list[Media],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MEDIA_PROXY_BENCH_TOKEN", user_token)
    settle_fills(synapse)
    code, report = run_cli(
        [
            "hit",
            "--url",
            proxy.url,
            "--uris",
            str(uris_file(tmp_path, files)),
            "--synapse-config",
            str(synapse.config_path),
            "--duration",
            "2s",
            "--concurrency",
            "4",
            "--verify-ratio",
            "1",
        ],
        capsys,
    )
    assert code == 0, report
    assert report["requests"] > 0 and report["ok"] == report["requests"]
    assert report["errors"] == {} and report["s3_gets"] == "unknown"
    # every body was hashed against the database's sha256 (Synapse records one on upload)
    assert report["verified_sha256"] == report["requests"]
    events = logged(proxy, report["request_id_prefix"], report["requests"])
    assert len(events) == report["requests"]
    assert sorted(int(e["request_id"].rsplit("-", 1)[1]) for e in events) == list(
        range(report["requests"])
    )
    assert {e["status"] for e in events} == {200}
    assert {e["source"] for e in events} == {"cache"}
    assert sum(e["bytes"] for e in events) == report["bytes"]

    # --sample reads Synapse's database (SQLite or PostgreSQL): only the 300 000-byte video
    code, report = run_cli(
        ["ranges", "--url", proxy.url, "--synapse-config", str(synapse.config_path),
         "--sample", "10", "--kind", "video", "--min-size", "300000", "--max-size", "300000",
         "--requests", "5", "--range-size", "1000"],
        capsys,
    )  # fmt: skip
    assert code == 0 and report["targets"] == 1 and report["ok"] == 5, report
    events = logged(proxy, report["request_id_prefix"], 5)
    assert {e["media_id"] for e in events} == {files[1].media_id}


def test_misses_evict_only_the_named_store_and_agree_with_the_log(
    synapse: Synapse,
    proxy: MediaProxy,
    user_token: str,
    files: list[Media],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    s3_faults: FaultProxy,
) -> None:
    uris = str(uris_file(tmp_path, files))
    base = ["bench", "miss", "--url", proxy.url, "--uris", uris, "--token", user_token]
    base += ["--synapse-config", str(synapse.config_path)]
    stored = [synapse.media_store_path / m.rel for m in files]
    settle_fills(synapse)
    assert all(p.exists() for p in stored)
    # not told the store, or told another one: refused, nothing deleted
    assert cli.main([*base, "--requests", "3"]) == 2
    assert cli.main([*base, "--requests", "3", "--evict-from", str(tmp_path)]) == 2
    assert "is not the configured store" in capsys.readouterr().err
    assert all(p.exists() for p in stored) and s3_faults.count() == 0

    # one at a time, so that no request can join another's fill: each one is a miss
    code, report = run_cli(
        [*base[1:], "--requests", "9", "--concurrency", "1", "--evict-from",
         str(synapse.media_store_path), "--verify-ratio", "1"],
        capsys,
    )  # fmt: skip
    assert code == 0, report
    assert report["requests"] == report["ok"] == report["misses"] == 9
    events = logged(proxy, report["request_id_prefix"], 9)
    assert len(events) == 9
    assert {e["source"] for e in events} == {"s3"} and {e["status"] for e in events} == {200}
    gets = [r for r in s3_faults.requests if r.method == "GET" and "local_content/" in r.path]
    assert len(gets) == 9
    settle_fills(synapse)
    assert all(p.exists() for p in stored)  # the proxy wrote every file back


async def test_thumbnails_and_ranges_report_what_came_back(
    synapse: Synapse, proxy: MediaProxy, user_token: str, files: list[Media]
) -> None:
    picture = upload(
        synapse.url,
        user_token,
        png(320, 240, 7),
        content_type="image/png",
        name="bench.png",
        server_name=synapse.server_name,
    )
    config = load(synapse_config=[synapse.config_path], need_synapse_url=False)
    sampled = await bench.sample_targets(config, 100_000, thumbnails=True)
    thumbs = [t for t in sampled if t.media_id == picture.media_id]
    assert thumbs and all(t.thumb is not None for t in thumbs)
    options = bench.Options(url=proxy.url, mode="thumbnails", token=user_token, requests=12)
    report = await bench.run(options, bench.Planner("thumbnails", thumbs))
    assert report["ok"] == report["requests"] == 12
    events = logged(proxy, options.request_id_prefix, 12)
    assert [e["route"].endswith("thumbnail") for e in events] == [True] * 12

    video = [t for t in await bench.enrich(config, [(m.server_name, m.media_id) for m in files])]
    video = [t for t in video if t.media_type == "video/mp4"]
    assert video[0].length == 300_000 and video[0].sha256
    options = bench.Options(url=proxy.url, mode="ranges", token=user_token, requests=8)
    report = await bench.run(options, bench.Planner("ranges", video, range_span=4096))
    events = logged(proxy, options.request_id_prefix, 8)
    assert report["requests"] == len(events) == 8
    logged_statuses: dict[str, int] = {}
    for e in events:
        logged_statuses[str(e["status"])] = logged_statuses.get(str(e["status"]), 0) + 1
    assert report["statuses"] == dict(sorted(logged_statuses.items()))
    assert report["ok"] == 8  # 206 with the asked part, or 200 with the whole file


def test_misses_report_how_long_s3_took_to_answer_the_proxy(
    synapse: Synapse,
    user_token: str,
    files: list[Media],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    s3_faults: FaultProxy,
) -> None:
    """With `--metrics-url`, the report's S3 wait is the proxy's own measure of its GETs:
    S3 made slow by the fault proxy shows in it, and in the misses' first bytes behind it."""
    port = free_port()
    metered = MediaProxy(
        tmp_path / "proxy",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_faults.url}},
        extra_args=["--metrics-listen", f"{LOOPBACK}:{port}"],
    ).start()
    delay = 0.25
    s3_faults.set_latency(delay, match=lambda method, path: method == "GET" and "local_" in path)
    try:
        settle_fills(synapse)
        code, report = run_cli(
            ["miss", "--url", metered.url, "--uris", str(uris_file(tmp_path, files[:1])),
             "--token", user_token, "--synapse-config", str(synapse.config_path),
             "--requests", "3", "--concurrency", "1", "--verify-ratio", "1",
             "--evict-from", str(synapse.media_store_path),
             "--metrics-url", f"http://{LOOPBACK}:{port}/metrics"],
            capsys,
        )  # fmt: skip
    finally:
        s3_faults.clear_faults()
        metered.stop()
    assert code == 0, report
    assert report["ok"] == report["misses"] == report["s3_gets"] == 3
    assert report["s3_get_wait_ms"] >= 1000 * delay
    assert report["ttfb_ms"]["p50"] >= 1000 * delay  # behind the proxy's wait
    settle_fills(synapse)
