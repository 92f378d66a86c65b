"""Where a miss spends its time: py-spy samples of the proxy's worker while misses run.

Starts SeaweedFS, Synapse (SQLite, S3 provider) and media-proxy with one worker, uploads one
file of `--size`, then runs `media-proxy bench miss` (the file evicted before each request)
for `--seconds` while `py-spy record` samples the worker (threads included, idle excluded).
Prints the bench report's key figures and the functions with the most samples, by own time
and by total time (a sample counts once per function on its stack).

    .venv/bin/python -m benchmarks.profile_miss [--size 20M] [--seconds 8] [--py-spy PATH]

py-spy is not a dependency: `pip install py-spy` anywhere and pass its path (it needs
ptrace: root, or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.compare import settle
from devstack.procs import stop_all, stop_on_sigterm
from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import bench
from media_proxy.bench import Options, Planner
from media_proxy.config import load


def collapsed(path: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """(own samples, total samples, all samples) by function from py-spy's raw output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        frames = [
            f.split(" (")[0] + " " + f.rsplit("/", 1)[-1].rstrip(")") for f in stack.split(";")
        ]
        samples += n
        if frames:
            own[frames[-1]] += n
        for f in set(frames):
            total[f] += n
    return own, total, samples


def main() -> None:
    stop_on_sigterm()  # a benchmark stopped with SIGTERM still stops its servers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20M", help="a number with K or M")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    size = int(args.size[:-1]) * {"K": 1024, "M": 1024**2}[args.size[-1]]
    with tempfile.TemporaryDirectory(prefix="profile-miss-") as tmp:
        work = Path(tmp)
        try:
            seaweed = SeaweedFS(work / "s3").start()
            synapse = Synapse(work / "synapse", s3=seaweed.create_bucket("media")).start()
            proxy = MediaProxy(
                work / "proxy",
                synapse_config=synapse.config_path,
                synapse_url=synapse.url,
                config={"log_format": "json"},
            ).start()
            assert proxy.process is not None
            token = synapse.register_user("bench", "bench-password")
            mxc = synapse.upload(token, os.urandom(size), filename="p.bin")
            server, _, media_id = mxc.removeprefix("mxc://").partition("/")
            config = load(synapse_config=[synapse.config_path], need_synapse_url=False)
            targets = asyncio.run(bench.enrich(config, [(server, media_id)]))
            settle(synapse.media_store_path)
            raw = work / "profile.txt"
            argv = [args.py_spy, "record", "--pid", str(proxy.process.pid), "--threads"]
            argv += ["--rate", "200", "--nonblocking", "--format", "raw", "--output", str(raw)]
            spy = subprocess.Popen(
                [*argv, "--duration", str(int(args.seconds))],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1.0)  # py-spy attaches
            options = Options(
                url=proxy.url,
                mode="miss",
                token=token,
                api="client",
                concurrency=args.concurrency,
                duration=args.seconds - 2,
                requests=None,
                verify_ratio=0.05,
                evict_store=synapse.media_store_path,
                metrics_url=None,
            )
            report = asyncio.run(bench.run(options, Planner("miss", targets, targets, seed=1)))
            spy.wait(timeout=60)
        finally:
            stop_all()
        print(
            f"\nmiss {args.size} c={args.concurrency}: {report['requests_per_s']:.0f} req/s,"
            f" {report['mb_per_s']:.0f} MB/s, latency p50 {report['latency_ms']['p50']:.2f} ms,"
            f" TTFB p50 {report['ttfb_ms']['p50']:.2f} ms, {report['requests'] - report['ok']}"
            " errors"
        )
        own, total, samples = collapsed(raw)
        print(f"\n{samples} samples of the worker (all threads, idle excluded)")
        for title, counter in (("own time", own), ("total time", total)):
            print(f"\nby {title}:")
            for name, n in counter.most_common(args.top):
                print(f"  {100 * n / samples:5.1f}%  {name}")


if __name__ == "__main__":
    main()
