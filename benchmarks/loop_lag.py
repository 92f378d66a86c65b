"""Loop lag (issue 11, "a serving loop that never stalls"): how late a tiny cache hit is
answered while the one worker streams a big miss from S3, and while the background evictor
passes over a store of many files; this checkout beside the code before it (91106af).

Starts the dev stack (SeaweedFS, Synapse with SQLite and the S3 provider), writes
`--files` tiny files into the store's `local_content` layout (no database rows: the evictor
walks, joins and plans over them, and skips each, S3 holding none), uploads a 1 KiB probe and
a `--size-mib` file, then for each version starts media-proxy with one worker twice:

- plain: idle, then during `--misses` downloads of the big file evicted from the store;
- with the background evictor (`cache_max_size` below the store, `cache_min_age` 0,
  `cache_evict_interval` 1 s): until `--passes` passes are logged.

A client thread GETs the probe (a hit) every 5 ms on one keep-alive connection throughout;
its latency is the lag, measured from outside, so it means the same on any version. The old
version runs from a `git worktree` of `--base` with PYTHONPATH pointing at it (and `python -P`,
so the working directory does not shadow it), removed at the end.

    .venv/bin/python -m benchmarks.loop_lag [--files 200000] [--size-mib 200] [--base 91106af]
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import os
import random
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from devstack.procs import stop_all, stop_on_sigterm
from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import paths

REPO = Path(__file__).resolve().parent.parent
PROBE_EVERY = 0.005
# Long TTLs: the probe measures the loop, not a periodic whoami or row lookup.
BASE_CONFIG = {"log_format": "json", "auth_cache_ttl": 3600, "metadata_cache_ttl": 3600}
EVICTOR_CONFIG = {"cache_max_size": "1M", "cache_min_age": 0, "cache_evict_interval": 1}


class Proxy(MediaProxy):
    """`python -P -m media_proxy serve ...`: with -P the working directory is not put first
    on sys.path, so PYTHONPATH decides which media_proxy runs."""

    def argv(self) -> list[str]:
        return [sys.executable, "-P", *super().argv()[1:]]


@dataclass
class Probe:
    """Latencies (ms) of the probe's hits in one window, and how many failed."""

    ms: list[float] = field(default_factory=list)
    errors: int = 0

    def percentile(self, p: float) -> float:
        ordered = sorted(self.ms)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


class Prober(threading.Thread):
    """GETs `path` every PROBE_EVERY seconds (a late probe goes at once, missed ticks are
    skipped) into `window`, which the main thread swaps between phases."""

    def __init__(self, port: int, path: str, token: str, size: int) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.size = port, path, size
        self.headers = {"Authorization": f"Bearer {token}"}
        self.window: Probe | None = None
        self.done = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        tick = time.perf_counter()
        while not self.done.is_set():
            window = self.window
            started = time.perf_counter()
            try:
                conn.request("GET", self.path, headers=self.headers)
                resp = conn.getresponse()
                body = resp.read()
                ok = resp.status == 200 and len(body) == self.size
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                ok = False
            elapsed = (time.perf_counter() - started) * 1000
            if window is not None:
                if ok:
                    window.ms.append(elapsed)
                else:
                    window.errors += 1
            tick += PROBE_EVERY
            now = time.perf_counter()
            if tick < now:
                tick = now
            else:
                time.sleep(tick - now)
        conn.close()


def tiny_files(store: Path, count: int) -> None:
    """`count` one-byte files at local_content paths of random 24-letter media ids (as
    Synapse names them: so spread over folders as a real store is)."""
    made: set[Path] = set()
    rng = random.Random(11)
    for _ in range(count):
        media_id = "".join(rng.choices(string.ascii_letters, k=24))
        path = store / paths.local_media(media_id)
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        path.write_bytes(b"x")


def download(port: int, path: str, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        received = 0
        while chunk := resp.read(1024 * 1024):
            received += len(chunk)
        return received
    finally:
        conn.close()


def wait_for_size(path: Path, size: int, timeout: float = 120.0) -> None:
    """Until the fill has put the whole file back (the proxy renames it into place)."""
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size == size):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} was not refilled within {timeout:.0f} s")
        time.sleep(0.05)


def passes(proxy: MediaProxy) -> int:
    """Evictor passes logged so far (complete lines only: the last may be being written)."""
    text = proxy.log_path.read_text()
    lines = text[: text.rfind("\n") + 1].splitlines()
    return sum(1 for line in lines if '"event": "cache_evict.pass"' in line)


def which_code(env: dict[str, str]) -> str:
    """Where `python -P` imports media_proxy from with `env`: proves which version runs."""
    return subprocess.run(
        [sys.executable, "-P", "-c", "import media_proxy; print(media_proxy.__file__)"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@dataclass
class Stack:
    synapse: Synapse
    token: str
    probe_path: str
    probe_size: int
    big_path: str
    big_file: Path
    big_size: int


def measure(
    stack: Stack, work: Path, label: str, env: dict[str, str], args: argparse.Namespace
) -> dict[str, Probe | int]:
    """The three windows for one version of the proxy."""
    synapse = stack.synapse
    results: dict[str, Probe | int] = {}

    def start(kind: str, config: dict[str, object]) -> tuple[MediaProxy, Prober]:
        proxy = Proxy(
            work / f"{label.split()[0]}-{kind}",
            synapse_config=synapse.config_path,
            synapse_url=synapse.url,
            config=config,
            env=env,
        ).start()
        prober = Prober(proxy.port, stack.probe_path, stack.token, stack.probe_size)
        prober.window = Probe()  # warm-up: the first hit asks whoami and the database
        prober.start()
        time.sleep(0.5)
        return proxy, prober

    def stop(proxy: MediaProxy, prober: Prober) -> None:
        prober.done.set()
        prober.join()
        proxy.stop()

    proxy, prober = start("plain", BASE_CONFIG)
    try:
        idle = prober.window = Probe()
        time.sleep(args.seconds)
        miss = Probe()
        for _ in range(args.misses):
            stack.big_file.unlink(missing_ok=True)
            prober.window = miss
            received = download(proxy.port, stack.big_path, stack.token)
            prober.window = None
            if received != stack.big_size:
                raise SystemExit(f"{label}: the miss brought {received} of {stack.big_size} bytes")
            wait_for_size(stack.big_file, stack.big_size)
    finally:
        stop(proxy, prober)

    proxy, prober = start("evict", {**BASE_CONFIG, **EVICTOR_CONFIG})
    try:
        first = passes(proxy)
        evict = prober.window = Probe()
        deadline = time.monotonic() + args.evict_timeout
        while passes(proxy) - first < args.passes:
            if time.monotonic() > deadline:
                raise SystemExit(f"{label}: fewer than {args.passes} evictor passes logged")
            time.sleep(0.1)
        prober.window = None
        results["passes"] = passes(proxy) - first
    finally:
        stop(proxy, prober)
    results.update(idle=idle, miss=miss, evict=evict)
    return results


def main() -> None:
    stop_on_sigterm()  # a benchmark stopped with SIGTERM still stops its servers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--misses", type=int, default=5)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="of the idle window")
    parser.add_argument("--evict-timeout", type=float, default=300.0)
    parser.add_argument("--base", default="91106af", help="the commit to compare with")
    args = parser.parse_args()
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    rows: list[tuple[str, dict[str, Probe | int]]] = []
    with tempfile.TemporaryDirectory(prefix="loop-lag-") as tmp:
        work = Path(tmp)
        worktree = work / "base"
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.base],
            check=True,
            capture_output=True,
        )
        try:
            versions = [(f"this checkout ({head})", {}), (args.base, {"PYTHONPATH": str(worktree)})]
            for label, env in versions:
                where = which_code(env)
                expected = worktree if env else REPO
                if not where.startswith(str(expected)):
                    raise SystemExit(f"{label}: media_proxy imports from {where}, not {expected}")
            seaweed = SeaweedFS(work / "s3").start()
            synapse = Synapse(work / "synapse", s3=seaweed.create_bucket("media")).start()
            token = synapse.register_user("bench", "bench-password")
            print(f"writing {args.files:,} tiny files into the store...", file=sys.stderr)
            tiny_files(synapse.media_store_path, args.files)
            probe = os.urandom(1024)
            probe_id = synapse.upload(token, probe, filename="probe.bin").rsplit("/", 1)[1]
            big_size = args.size_mib * 1024 * 1024
            big_id = synapse.upload(token, os.urandom(big_size), filename="big.bin").rsplit("/")[-1]
            client = f"/_matrix/client/v1/media/download/{synapse.server_name}"
            stack = Stack(
                synapse,
                token,
                f"{client}/{probe_id}",
                len(probe),
                f"{client}/{big_id}",
                synapse.media_store_path / paths.local_media(big_id),
                big_size,
            )
            for label, env in versions:
                print(f"measuring {label}...", file=sys.stderr)
                rows.append((label, measure(stack, work, label, env, args)))
            print_table(rows, args)
            sys.stdout.flush()
            print(f"removing {work} ({args.files:,} files)...", file=sys.stderr)
        finally:
            stop_all()
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)],
                check=False,
            )
            # The store's 400k entries: rm -rf, rather than TemporaryDirectory's slower rmtree.
            subprocess.run(["rm", "-rf", "--one-file-system", str(work / "synapse")], check=False)


def print_table(rows: list[tuple[str, dict[str, Probe | int]]], args: argparse.Namespace) -> None:
    today = datetime.date.today().isoformat()
    cores = os.cpu_count()
    print(
        f"\nloop lag {today}, {cores} cores: latency (ms) of a 1 KiB cache hit probed every"
        f" 5 ms, one worker;\nmiss: {args.misses} x {args.size_mib} MiB streamed from S3;"
        f" evictor: {args.passes}+ passes over {args.files:,} files"
    )
    windows = (("idle", "idle"), ("miss", "during the miss"), ("evict", "during evictor passes"))
    print(f"{'':26}" + "".join(f"{title:>26}" for _, title in windows))
    print(f"{'version':26}" + f"{'p50':>8} {'p99':>8} {'max':>8}" * len(windows))
    for label, result in rows:
        cells = ""
        for key, _ in windows:
            probe = result[key]
            assert isinstance(probe, Probe)
            cells += f"{probe.percentile(50):8.2f} {probe.percentile(99):8.2f} {max(probe.ms):8.2f}"
        print(f"{label:26}{cells}")
    for label, result in rows:
        counts = ", ".join(
            f"{key} {len(p.ms)}" + (f" ({p.errors} failed)" if p.errors else "")
            for key, _ in windows
            if isinstance(p := result[key], Probe)
        )
        print(f"  {label}: probes {counts}; evictor passes {result['passes']}")


if __name__ == "__main__":
    main()
