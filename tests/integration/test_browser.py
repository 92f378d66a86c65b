"""Seeking a video in a real browser: Debian's chromium (driven by Playwright) plays an evicted
video from media-proxy and seeks to its middle, against real SeaweedFS, Synapse (SQLite: the
database plays no part in Range) and `media-proxy serve` with 3 workers.

The page is served from loopback by the test; its <video> points at the proxy's client-API
download URL with the access token in the query (a <video> cannot send a header).
"""

from __future__ import annotations

import http.server
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, sync_playwright

from devstack.proxy import MediaProxy
from devstack.synapse import Synapse
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG
from tests.integration.media import Media, evict, upload
from tests.integration.test_faults import wait_for
from tests.integration.test_ranges import wait_for_file

pytestmark = [
    pytest.mark.integration,
    pytest.mark.parametrize("synapse", ["sqlite"], indirect=True),
]

CHROMIUM = "/usr/bin/chromium"  # Debian's package: `playwright install` cannot download here
FFMPEG = "/usr/bin/ffmpeg"  # Debian's package, for the sample video only
SECONDS, FPS = 30, 25
TIMEOUT_MS = 10_000  # the longest the page waits for one browser event

# Load the metadata, seek to the middle, wait for `seeked` and a decodable frame there.
# Rejects on a media error or when an event does not come in time: never hangs.
SEEK = """async ([timeout]) => {
    const v = document.querySelector('video');
    const next = (name, ready) => new Promise((resolve, reject) => {
        if (ready()) return resolve();
        const timer = setTimeout(() => reject(new Error(`no ${name} in ${timeout} ms`)), timeout);
        v.addEventListener(name, () => { clearTimeout(timer); resolve(); }, {once: true});
        v.addEventListener('error', () => {
            clearTimeout(timer); reject(new Error(`media error ${v.error && v.error.code}`));
        }, {once: true});
    });
    await next('loadedmetadata', () => v.readyState >= 1);
    const duration = v.duration;
    const target = duration / 2;
    const seeked = next('seeked', () => false);
    v.currentTime = target;
    await seeked;
    await next('loadeddata', () => v.readyState >= 2);
    return {duration, currentTime: v.currentTime, readyState: v.readyState};
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox"], headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


def h264(path: Path) -> bytes:
    """A real H.264 MP4 (moov first) of SECONDS at FPS, a keyframe every second, about 8 MB:
    big enough that chromium asks for later parts with new ranges. (devstack.samples' video
    plays too, but at 1 MB its first answer brings the whole file and no other is needed.)"""
    subprocess.run(
        [
            FFMPEG,
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"testsrc2=size=640x360:rate={FPS}",
            "-t",
            str(SECONDS),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-g",
            str(FPS),
            "-b:v",
            "4M",
            "-pix_fmt",
            "yuv420p",
            "-movflags",
            "+faststart",
            str(path),
        ],
        check=True,
        timeout=60,
    )
    return path.read_bytes()


@pytest.fixture(scope="module")
def video(synapse: Synapse, user_token: str, tmp_path_factory: pytest.TempPathFactory) -> Media:
    return upload(
        synapse.url,
        user_token,
        h264(tmp_path_factory.mktemp("browser") / "seek.mp4"),
        content_type="video/mp4",
        name="bounce.mp4",
        server_name=synapse.server_name,
    )


class _Page(http.server.BaseHTTPRequestHandler):
    html = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.html)))
        self.end_headers()
        self.wfile.write(self.html)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def page_server(src: str) -> http.server.ThreadingHTTPServer:
    """A loopback server answering every GET with a page holding one <video src=...>."""
    html = f'<!doctype html><video preload="metadata" muted src="{src}"></video>'
    handler = type("Page", (_Page,), {"html": html.encode()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def seek_in_browser(browser: Browser, server: MediaProxy, media: Media, token: str) -> Any:
    """Open the page for `media` on `server`, seek to the middle, close the page (ending the
    browser's requests); returns what the page saw and, for each answer the browser got,
    the Range header it sent and the status."""
    src = f"{server.url}{media.client_path()}?access_token={token}"
    site = page_server(src)
    answers: list[tuple[str | None, int]] = []
    try:
        page = browser.new_page()
        # Every request the media element makes reaches the proxy (none from the HTTP cache).
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.setCacheDisabled", {"cacheDisabled": True})
        page.on(
            "response",
            lambda r: (
                answers.append((r.request.headers.get("range"), r.status))
                if media.media_id in r.url
                else None
            ),
        )
        try:
            page.goto(f"http://127.0.0.1:{site.server_port}/", timeout=TIMEOUT_MS)
            seen = page.evaluate(SEEK, [TIMEOUT_MS])
        finally:
            page.close()
    finally:
        site.shutdown()
        site.server_close()
    return seen, answers


def statuses(server: MediaProxy, media: Media, count: int) -> list[int]:
    """The statuses of the proxy's `request` events for `media`, once at least `count` are
    logged (a request the browser left open is logged when the closed page ends it)."""

    def find() -> list[int] | None:
        found = [
            e["status"]
            for e in server.log_events()
            if e.get("event") == "request" and e.get("media_id") == media.media_id
        ]
        return found if len(found) >= count else None

    found = wait_for(find)
    assert found is not None, f"fewer than {count} request events for {media.media_id}"
    return list(found)


def test_seek_in_chromium_gets_206s_and_refills(
    browser: Browser, synapse: Synapse, proxy: MediaProxy, user_token: str, video: Media
) -> None:
    evict(synapse, video)
    seen, answers = seek_in_browser(browser, proxy, video, user_token)
    assert seen["duration"] == pytest.approx(SECONDS, abs=1 / FPS)
    assert seen["currentTime"] == pytest.approx(SECONDS / 2, abs=1 / FPS)
    assert seen["readyState"] >= 2
    assert answers and all(r and r.startswith("bytes=") and s == 206 for r, s in answers), answers
    assert any(r != "bytes=0-" for r, _ in answers), answers  # it asked for a later part too
    logged = statuses(proxy, video, len(answers))
    assert set(logged) == {206}, logged
    assert wait_for_file(synapse, video)  # the whole file is back, byte for byte


def test_ranges_false_gets_only_200s(
    browser: Browser,
    synapse: Synapse,
    user_token: str,
    video: Media,
    s3_proxy: FaultProxy,
    devstack_dir: Path,
) -> None:
    server = MediaProxy(
        devstack_dir / f"browser-ranges-off-{uuid.uuid4().hex[:8]}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        config={**TEST_PROXY_CONFIG, "ranges": False, "s3": {"endpoint_url": s3_proxy.url}},
    ).start()
    try:
        evict(synapse, video)
        seen, answers = seek_in_browser(browser, server, video, user_token)
        assert seen["duration"] == pytest.approx(SECONDS, abs=1 / FPS)
        # Synapse's answer (200, no Accept-Ranges): chromium finds the video unseekable.
        assert seen["currentTime"] == 0
        assert answers and all(s == 200 for _, s in answers), answers
        logged = statuses(server, video, len(answers))
        assert set(logged) == {200}, logged
        assert wait_for_file(synapse, video)
    finally:
        server.stop()
