"""The local demo: a real stack on loopback and a walk through what media-proxy does.

SeaweedFS stands in for Garage, Synapse runs with SQLite and the S3 provider, media-proxy
sits in front. Media is uploaded, evicted from the store, fetched through the proxy (from
S3, written back) and fetched again (from the cache). With `--once` it stops after the
walk-through; otherwise it keeps the stack up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any

from media_proxy.devstack.procs import StartupError, stop_all
from media_proxy.devstack.proxy import MediaProxy
from media_proxy.devstack.seaweed import SeaweedFS
from media_proxy.devstack.synapse import Synapse

REPO_ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "demo", "demo-password"


def say(message: str) -> None:
    print(message, flush=True)


def png(width: int, height: int, seed: int) -> bytes:
    """A real PNG (a colour gradient) without any imaging library."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            rows += bytes(((x * 255 // width + seed) % 256, (y * 255 // height) % 256, seed % 256))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )


def samples() -> list[tuple[str, str, bytes]]:
    return [
        ("sunrise.png", "image/png", png(640, 480, 40)),
        ("harbour.png", "image/png", png(1600, 1200, 160)),
        ("clip.bin", "application/octet-stream", os.urandom(24 * 1024 * 1024)),
    ]


def fetch(url: str, path: str, token: str) -> tuple[int, bytes, float]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    started = time.perf_counter()
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body, (time.perf_counter() - started) * 1000


def last_source(log_path: Path, media_id: str) -> str:
    """Where the proxy says it served the last request for `media_id` from."""
    source = "?"
    for line in log_path.read_text().splitlines():
        if media_id in line and '"event": "request"' in line:
            source = json.loads(line).get("source", "?")
    return source


def walk_through(synapse: Synapse, proxy: MediaProxy, token: str) -> bool:
    ok = True
    say(f"\n  {'file':14} {'size':>12}  {'1st fetch':20} {'2nd fetch':20} store refilled")
    for name, content_type, data in samples():
        status, _, raw = synapse.request(
            "POST",
            f"/_matrix/media/v3/upload?filename={name}",
            body=data,
            token=token,
            headers={"Content-Type": content_type},
        )
        if status != 200:
            raise RuntimeError(f"upload of {name} failed: {status} {raw[:200]!r}")
        media_id = json.loads(raw)["content_uri"].rsplit("/", 1)[1]
        stored = (
            synapse.media_store_path / "local_content" / media_id[:2] / media_id[2:4] / media_id[4:]
        )
        stored.unlink()  # evict: S3 keeps the only copy
        path = f"/_matrix/client/v1/media/download/{synapse.server_name}/{media_id}"
        cells = []
        for _ in range(2):
            status, body, ms = fetch(proxy.url, path, token)
            same = status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(data).digest()
            ok &= same
            time.sleep(0.05)  # let the log line land
            cells.append(
                f"{last_source(proxy.log_path, media_id):6} {ms:7.1f} ms {'ok' if same else 'BAD'}"
            )
        refilled = stored.exists() and stored.read_bytes() == data
        ok &= refilled
        say(
            f"  {name:14} {len(data) / 1024:8.0f} KiB  {cells[0]:20} {cells[1]:20}"
            f" {'yes' if refilled else 'NO'}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after the walk-through")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".demo")
    args = parser.parse_args(argv)
    work: Path = args.workdir
    shutil.rmtree(
        work, ignore_errors=True
    )  # a re-run starts clean; the last one's processes are gone
    work.mkdir(parents=True)
    try:
        say("==> starting SeaweedFS (the S3 server standing in for Garage)")
        seaweed = SeaweedFS(work / "seaweedfs").start()
        s3 = seaweed.create_bucket("media")
        say(f"    S3 at {seaweed.endpoint_url}, bucket 'media'")
        say("==> starting Synapse (SQLite, synapse-s3-storage-provider)")
        synapse = Synapse(work / "synapse", s3=s3).start()
        say(f"    Synapse at {synapse.url}")
        say("==> starting media-proxy (2 workers)")
        proxy = MediaProxy(
            work / "media-proxy",
            synapse_config=synapse.config_path,
            synapse_url=synapse.url,
            workers=2,
        ).start()
        say(f"    media-proxy at {proxy.url}")
        token = synapse.register_user(USER, PASSWORD)
        say(f"==> user @{USER}:{synapse.server_name} created; uploading, evicting, fetching")
        ok = walk_through(synapse, proxy, token)
    except (StartupError, RuntimeError, OSError) as e:
        say(f"demo failed: {e}")
        stop_all()
        return 1
    say("\n1st fetch: the file was missing locally, streamed from S3 and written back;")
    say("2nd fetch: served from the local store with sendfile.")
    if args.once:
        stop_all()
        return 0 if ok else 1
    info: dict[str, Any] = {
        "media-proxy": proxy.url,
        "synapse": synapse.url,
        "login": f"@{USER}:{synapse.server_name} / {PASSWORD}",
        "logs": str(work),
    }
    say("\nThe stack stays up until Ctrl-C:")
    for key, value in info.items():
        say(f"  {key:12} {value}")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    say("stopping")
    stop_all()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
