"""Memory of a big miss: does the proxy's RSS stay flat while it streams a file from S3?

Starts the dev stack (SeaweedFS, Synapse with SQLite and the S3 provider, media-proxy with one
worker), uploads one big file, evicts it, and downloads it once through media-proxy and once
through Synapse (the reference, measured in the same run), sampling each server's resident
memory while the bytes flow. Prints peak RSS and its growth side by side.

    .venv/bin/python -m benchmarks.miss_memory [--size-mib 200]
"""

from __future__ import annotations

import argparse
import http.client
import tempfile
import threading
import time
from pathlib import Path

from devstack.procs import stop_all, stop_on_sigterm
from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the proxy's workers, if any)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def download(port: int, path: str, token: str, pid: int) -> tuple[int, int, int, float]:
    """GET `path`, discarding the body; returns (bytes, rss before, peak rss, seconds)."""
    before = rss_kib(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    received = 0
    while chunk := resp.read(1024 * 1024):
        received += len(chunk)
    elapsed = time.perf_counter() - started
    conn.close()
    done.set()
    sampler.join()
    return received, before, peak, elapsed


def main() -> None:
    stop_on_sigterm()  # a benchmark stopped with SIGTERM still stops its servers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=200)
    args = parser.parse_args()
    size = args.size_mib * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="miss-memory-") as tmp:
        work = Path(tmp)
        try:
            seaweed = SeaweedFS(work / "s3").start()
            synapse = Synapse(work / "synapse", s3=seaweed.create_bucket("media")).start()
            proxy = MediaProxy(
                work / "proxy", synapse_config=synapse.config_path, synapse_url=synapse.url
            ).start()
            token = synapse.register_user("bench", "bench-password")
            blob = work / "blob.bin"
            with blob.open("wb") as f:
                for _ in range(args.size_mib):
                    f.write(bytes(range(256)) * 4096)
            status, _, raw = synapse.request(
                "POST",
                "/_matrix/media/v3/upload?filename=big.bin",
                body=blob.read_bytes(),
                token=token,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert status == 200, raw
            media_id = raw.decode().split("/")[-1].rstrip('"}')
            stored = synapse.media_store_path / paths.local_media(media_id)
            path = f"/_matrix/client/v1/media/download/{synapse.server_name}/{media_id}"
            assert synapse.process is not None and proxy.process is not None
            rows = []
            for name, port, pid in [
                ("media-proxy", proxy.port, proxy.process.pid),
                ("Synapse (reference)", synapse.port, synapse.process.pid),
            ]:
                stored.unlink(missing_ok=True)  # evicted: the bytes must come from S3
                received, before, peak, secs = download(port, path, token, pid)
                assert received == size, (name, received)
                rows.append((name, before, peak, secs))
        finally:
            stop_all()
    print(f"\nstreaming an evicted {args.size_mib} MiB file from S3 (one client)")
    print(f"{'server':22} {'RSS before':>12} {'peak RSS':>12} {'growth':>10} {'MiB/s':>8}")
    for name, before, peak, secs in rows:
        print(
            f"{name:22} {before / 1024:9.1f} MiB {peak / 1024:9.1f} MiB"
            f" {(peak - before) / 1024:7.1f} MiB {args.size_mib / secs:8.0f}"
        )


if __name__ == "__main__":
    main()
