"""Cache hits side by side: media-proxy against Synapse serving the same file, same run.

Starts the dev stack (SeaweedFS, Synapse with SQLite and the S3 provider, media-proxy), uploads
a small and a big file, and loads each server with `wrk` (Debian package `wrk`) on loopback for
a few seconds per case. Prints requests/s, median latency and throughput. Figures on a shared
2-core machine are noisy: compare the columns of one run, not runs with each other.

    .venv/bin/python -m benchmarks.hits [--seconds 5] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from devstack.procs import stop_all
from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse

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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
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
            proxy = MediaProxy(
                work / "proxy",
                synapse_config=synapse.config_path,
                synapse_url=synapse.url,
                workers=args.workers,
                config={"log_format": "json"},
            ).start()
            token = synapse.register_user("bench", "bench-password")
            files = {
                "10 KiB": os.urandom(10 * 1024),
                "20 MiB": os.urandom(20 * 1024 * 1024),
            }
            for label, data in files.items():
                mxc = synapse.upload(token, data, content_type="image/png", filename="b.png")
                media_id = mxc.rsplit("/", 1)[1]
                path = f"/_matrix/client/v1/media/download/{synapse.server_name}/{media_id}"
                for connections in (1, 32) if label == "10 KiB" else (4,):
                    for name, base in (("media-proxy", proxy.url), ("Synapse", synapse.url)):
                        rps, p50, mbs = wrk(base + path, token, connections, args.seconds)
                        rows.append((label, connections, name, rps, p50, mbs))
        finally:
            stop_all()
    print(f"\ncache hits, client API with a token, {args.workers} media-proxy workers")
    print(f"{'file':8} {'conns':>5}  {'server':12} {'req/s':>9} {'p50':>9} {'MB/s':>9}")
    for label, connections, name, rps, p50, mbs in rows:
        print(f"{label:8} {connections:5}  {name:12} {rps:9.0f} {p50:>9} {mbs:9.1f}")


if __name__ == "__main__":
    main()
