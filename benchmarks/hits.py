"""Cache hits side by side with wrk: nginx static, media-proxy (asyncio and uvloop loops),
media-proxy behind the shipped nginx site in X-Accel and fast-hit modes, and Synapse.

Starts the dev stack (SeaweedFS, Synapse with SQLite and the S3 provider, three media-proxies,
two nginx fronts and a plain nginx aliasing the media store), uploads a 1 KiB and a 20 MiB
file, and loads each server with `wrk` (Debian package `wrk`: a C client, so small-file rates
are not bounded by a Python client as in benchmarks.compare) on loopback for a few seconds per
case. Prints requests/s, median latency, throughput and the ratio to nginx static. wrk shares
the 2 cores with the servers: compare the rows of one run, not runs with each other.

    .venv/bin/python -m benchmarks.hits [--seconds 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks.compare import ACCEL_LOCATION, front_nginx, start_proxy, static_nginx
from devstack.procs import stop_all, stop_on_sigterm
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths

_UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "KB": 1024, "MB": 1024**2, "GB": 1024**3}


def wrk(url: str, token: str, connections: int, seconds: int) -> tuple[float, str, float]:
    """(requests/s, median latency, MB/s) of one wrk run."""
    out = subprocess.run(
        [
            "wrk",
            f"-t{min(2, connections)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])  # type: ignore[index]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.MULTILINE)[1]  # type: ignore[index]
    value, unit = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", out).groups()  # type: ignore[union-attr]
    return rps, p50, float(value) * _UNITS[unit] / 1e6


def main() -> None:
    stop_on_sigterm()  # a benchmark stopped with SIGTERM still stops its servers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("benchmarks/hits.py needs wrk: apt-get install wrk")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hits-") as tmp:
        work = Path(tmp)
        try:
            seaweed = SeaweedFS(work / "s3").start()
            synapse = Synapse(work / "synapse", s3=seaweed.create_bucket("media")).start()

            proxy = start_proxy(work, "proxy", synapse, args.workers)
            other = start_proxy(work, "proxy-uvloop", synapse, args.workers, loop="uvloop")
            accel = start_proxy(
                work,
                "proxy-accel",
                synapse,
                args.workers,
                extra_args=["--accel-redirect", ACCEL_LOCATION],
            )
            x_accel = front_nginx(work, "nginx-accel", accel, synapse, fast_hits=False)
            fast = front_nginx(work, "nginx-fast", accel, synapse, fast_hits=True)
            static_url, static = static_nginx(work / "nginx-static", synapse.media_store_path)
            token = synapse.register_user("bench", "bench-password")
            files = {"1 KiB": os.urandom(1024), "20 MiB": os.urandom(20 * 1024 * 1024)}
            for label, data in files.items():
                mxc = synapse.upload(token, data, content_type="image/png", filename="b.png")
                media_id = mxc.rsplit("/", 1)[1]
                path = f"/_matrix/client/v1/media/download/{synapse.server_name}/{media_id}"
                servers = {
                    "nginx static": static_url + "/" + paths.local_media(media_id),
                    "media-proxy": proxy.url + path,
                    "media-proxy (uvloop)": other.url + path,
                    "+ nginx X-Accel": x_accel.url + path,
                    "+ nginx fast hits": fast.url + path,
                    "Synapse": synapse.url + path,
                }
                for connections in (1, 32) if label == "1 KiB" else (4,):
                    limit = 0.0
                    for name, url in servers.items():
                        rps, p50, mbs = wrk(url, token, connections, args.seconds)
                        limit = limit or rps
                        rows.append((label, connections, name, rps, p50, mbs, rps / limit))
            static.stop()
        finally:
            stop_all()
    print(f"\ncache hits with wrk, client API with a token, {args.workers} media-proxy workers")
    head = (
        f"{'file':8} {'conns':>5}  {'server':22} {'req/s':>9} {'p50':>9} {'MB/s':>9} {'x nginx':>8}"
    )
    print(head)
    print("-" * len(head))
    for label, connections, name, rps, p50, mbs, ratio in rows:
        print(f"{label:8} {connections:5}  {name:22} {rps:9.0f} {p50:>9} {mbs:9.1f} {ratio:8.2f}")


if __name__ == "__main__":
    main()
