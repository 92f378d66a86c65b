"""The cache commands on a large synthetic store: seconds, peak RSS and S3 requests.

Builds once, into a reusable directory (`--dir`, one sub-folder per size), a store of N small
local media files (100-2,000 bytes) with their rows in Synapse's SQLite database (the schema
Synapse itself creates: it is started once, then stopped; rows are inserted as Synapse's
upload path would write them, `last_access_ts` spread over 60 days, mtimes 3 days old) and
the same objects in SeaweedFS. Then runs, each as its own process through a fault proxy
(tests/faults.py) in front of SeaweedFS that counts S3 requests:

- `cache status` (every file joined with the S3 listing), and beside it, as the reference,
  the S3 server listing the same folder with nothing else running: one page after another,
  and in ranges several at once as the join lists;
- `cache upload --dry-run` (the same join; nothing is missing, so nothing is uploaded);
- `cache evict` freeing a fixed 2,000 files' worth (memory against store size), then one
  freeing 10% of the store; evicted files are written back afterwards (their content is a
  function of their media id) so the directory can be reused.

    .venv/bin/python -m benchmarks.scale --files 100000 [--files 300000] [--dir DIR]
        [--only evict]   (only the rows whose command contains this; repeatable)

Building is the slow part (S3 PUTs: about 1 ms each here, with 16 in flight); a second run
of the same size reuses it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import random
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from devstack.procs import stop_on_sigterm
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths
from media_proxy.config import load
from media_proxy.inventory import plan_ranges, ranged_pages
from media_proxy.s3 import S3
from tests.faults import FaultProxy

BUCKET = "media"
DAY_MS = 86_400_000
OLD = time.time() - 3 * 86400


def media_id(i: int) -> str:
    rng = random.Random(i)
    return "".join(rng.choices(string.ascii_letters, k=24))


def content(mid: str, size: int) -> bytes:
    return random.Random(mid).randbytes(size)


def write_file(root: Path, mid: str, size: int) -> None:
    path = root / paths.local_media(mid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content(mid, size))
    os.utime(path, (OLD, OLD))


def build(work: Path, files: int) -> None:
    """Synapse's schema, rows, files and S3 objects for `files` media (skipped once built)."""
    if (work / "built.json").exists():
        return
    started = time.monotonic()
    seaweed = SeaweedFS(work / "seaweedfs").start()
    try:
        s3 = seaweed.create_bucket(BUCKET)
        synapse = Synapse(work / "synapse", s3=s3).start()  # creates the schema
        synapse.stop()
        root = synapse.media_store_path
        db_path = work / "synapse" / "homeserver.db"
        now = int(time.time() * 1000)
        rng = random.Random(files)
        rows = []
        for i in range(files):
            mid, size = media_id(i), rng.randint(100, 2000)
            access = now - rng.randint(DAY_MS, 60 * DAY_MS)
            rows.append((mid, "application/octet-stream", size, access - DAY_MS, access))
        with sqlite3.connect(db_path) as conn:
            conn.executemany(
                "INSERT INTO local_media_repository (media_id, media_type, media_length,"
                " created_ts, user_id, last_access_ts) VALUES (?, ?, ?, ?, '@u:devstack.test', ?)",
                rows,
            )
        print(f"rows: {time.monotonic() - started:.0f} s", file=sys.stderr)
        for mid, _, size, _, _ in rows:
            write_file(root, mid, size)
        print(f"files: {time.monotonic() - started:.0f} s", file=sys.stderr)
        client = seaweed.client()

        def put(row: tuple[Any, ...]) -> None:
            mid, size = row[0], row[2]
            client.put_object(Bucket=BUCKET, Key=paths.local_media(mid), Body=content(mid, size))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            for n, _ in enumerate(pool.map(put, rows), 1):
                if n % 50_000 == 0:
                    print(f"S3 PUT {n}: {time.monotonic() - started:.0f} s", file=sys.stderr)
        seconds = time.monotonic() - started
        (work / "built.json").write_text(json.dumps({"files": files, "build_seconds": seconds}))
        print(f"built {files} files in {seconds:.0f} s", file=sys.stderr)
    finally:
        seaweed.stop()


def run(argv: list[str]) -> tuple[float, int, str]:
    """(seconds, peak RSS in bytes, stdout) of one command, as its own process.

    The peak is the child's VmHWM, read while it runs (every 20 ms; the mark only grows):
    getrusage's ru_maxrss would carry over this big parent's, since Linux keeps a maximum
    across fork and execve."""
    started = time.monotonic()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, vm_hwm(proc.pid))
            time.sleep(0.02)
        out.seek(0)
        text = out.read()
    assert proc.returncode == 0, (argv, proc.returncode, text[-2000:])
    return time.monotonic() - started, peak, text


def vm_hwm(pid: int) -> int:
    """A process's peak RSS so far in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def listing_alone(work: Path, config: Path, *, ranged: bool) -> tuple[float, int]:
    """Seconds and requests to list the store's local folder and nothing else: the S3
    server's share of `cache status`, one page after another or in ranges as the join
    lists them."""
    loaded = load(
        config_file=config,
        synapse_config=[work / "synapse" / "homeserver.yaml"],
        need_synapse_url=False,
    )
    assert loaded.s3 is not None

    async def listing() -> int:
        assert loaded.s3 is not None
        s3 = S3(loaded.s3)
        await s3.start()
        try:
            seg = "local_content/"
            bounds = plan_ranges(str(loaded.cache_path), seg) if ranged else []
            return len([page async for page in ranged_pages(s3, seg, bounds)])
        finally:
            await s3.close()

    started = time.monotonic()
    pages = asyncio.run(listing())
    return time.monotonic() - started, pages


def restore(work: Path) -> int:
    """Write back the files an eviction removed; returns how many."""
    root = work / "synapse" / "media_store"
    with sqlite3.connect(work / "synapse" / "homeserver.db") as conn:
        rows = conn.execute("SELECT media_id, media_length FROM local_media_repository").fetchall()
    missing = [(m, s) for m, s in rows if not (root / paths.local_media(m)).exists()]
    for mid, size in missing:
        write_file(root, mid, size)
    return len(missing)


def store_size(work: Path) -> tuple[int, int]:
    """(files, bytes) of the whole store, from its database rows (restore() completes it)."""
    db = sqlite3.connect(work / "synapse" / "homeserver.db")
    try:
        count, total = db.execute(
            "SELECT count(*), sum(media_length) FROM local_media_repository"
        ).fetchone()
    finally:
        db.close()
    return int(count), int(total)


def measure(work: Path, files: int, only: list[str] | None = None) -> list[dict[str, Any]]:
    build(work, files)
    restore(work)
    seaweed = SeaweedFS(work / "seaweedfs").start()
    proxy = FaultProxy(seaweed.host, seaweed.s3_port).start()
    results: list[dict[str, Any]] = []
    try:
        config = work / "media-proxy.yaml"
        config.write_text(yaml.safe_dump({"s3": {"endpoint_url": proxy.url}}))
        # The counting proxy relays every byte in Python, on the same cores: the timing row
        # of `cache status` also runs without it (its requests are then uncounted).
        direct = work / "media-proxy-direct.yaml"
        direct.write_text(yaml.safe_dump({"s3": {"endpoint_url": seaweed.endpoint_url}}))
        base = [sys.executable, "-m", "media_proxy", "cache"]
        flags = ["--synapse-config", str(work / "synapse" / "homeserver.yaml")]
        flags += ["--log-format", "json"]

        def wanted(name: str) -> bool:
            return not only or any(o in name for o in only)

        def one(name: str, *args: str, counted: bool = True) -> dict[str, Any]:
            if not wanted(name):
                return {}
            proxy.reset()
            where = ["--config", str(config if counted else direct)]
            seconds, rss, out = run([*base, *args, *flags, *where, "--json"])
            summary = json.loads(out.splitlines()[-1])
            reqs = proxy.requests if counted else []
            row = {
                "files": files,
                "command": name,
                "seconds": round(seconds, 1),
                "peak_rss_mb": round(rss / 2**20),
                "s3_list": sum(1 for r in reqs if r.method == "GET" and "list-type=2" in r.path),
                "s3_head": sum(1 for r in reqs if r.method == "HEAD"),
                "s3_get": sum(1 for r in reqs if r.method == "GET" and "list-type=2" not in r.path),
                "s3_put": sum(1 for r in reqs if r.method == "PUT"),
                "acted_files": summary.get("files"),
            }
            print(json.dumps(row), flush=True)
            results.append(row)
            return summary

        one("cache status", "status")
        one("cache status (S3 not through the proxy)", "status", counted=False)
        for ranged in (False, True):  # the reference: what the S3 server takes to list alone
            if not wanted("S3 listing alone"):
                break
            seconds, pages = listing_alone(work, direct, ranged=ranged)
            row = {
                "files": files,
                "command": f"S3 listing alone ({'ranges' if ranged else 'one by one'})",
                "seconds": round(seconds, 1),
                "peak_rss_mb": "-",
                "s3_list": pages,
                "s3_head": 0,
                "s3_get": 0,
                "s3_put": 0,
            }
            print(json.dumps(row), flush=True)
            results.append(row)
        one("cache upload --dry-run", "upload", "--dry-run")
        count, total = store_size(work)
        mean = total / count
        for label, free in (("2000 files", int(2000 * mean)), ("10%", total // 10)):
            if one(f"cache evict (free {label})", "evict", "--max-size", str(total - free)):
                restore(work)
    finally:
        proxy.stop()
        seaweed.stop()
    return results


def main() -> None:
    stop_on_sigterm()  # a benchmark stopped with SIGTERM still stops its servers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, action="append", help="store size (repeatable)")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/media-proxy-scale"))
    parser.add_argument(
        "--only", action="append", help="only rows whose command contains this (repeatable)"
    )
    args = parser.parse_args()
    rows = []
    for files in args.files or [100_000]:
        rows += measure(args.dir / str(files), files, args.only)
    print(f"{'files':>9} {'command':40} {'s':>7} {'RSS MB':>7} {'LIST':>6} {'HEAD':>7} {'GET':>6}")
    for r in rows:
        print(
            f"{r['files']:>9} {r['command']:40} {r['seconds']:>7} {r['peak_rss_mb']:>7}"
            f" {r['s3_list']:>6} {r['s3_head']:>7} {r['s3_get']:>6}"
        )


if __name__ == "__main__":
    main()
