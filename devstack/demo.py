"""The local demo: a real stack on loopback and a walk through what media-proxy does.

SeaweedFS stands in for Garage, Synapse runs with SQLite and the S3 provider, media-proxy
sits in front of Synapse's media endpoints and nginx (the shipped nginx/media-proxy.conf) in
front of both, as in production. A user uploads a few images and a short video; their files
are evicted from the local store (S3 keeps them); each is fetched twice through nginx: the
first time media-proxy streams it from S3 and writes it back, the second time it sends it
from the store. For each fetch the demo prints where the proxy says it served it from (its
JSON request log), how long it took, and whether the store was refilled.

With `--once` it stops after the walk-through (what CI runs); otherwise it keeps the stack up,
with its URLs and a login printed, until Ctrl-C. Re-running is safe: a run still going with the
same work dir is refused, parts left over by a killed run are stopped (by the PIDs it
recorded), and the work dir starts clean.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from devstack.nginx import Nginx
from devstack.procs import (
    ManagedProcess,
    stop_all,
)
from devstack.proxy import MediaProxy
from devstack.samples import Sample, samples
from devstack.seaweed import SeaweedFS, grpc_sockets_of, remove_stale_sockets
from devstack.synapse import Synapse, local_content_key

REPO_ROOT = Path(__file__).resolve().parents[1]
USER, PASSWORD = "demo", "demo-password"
PROXY_WORKERS = 2


def say(message: str = "", *, end: str = "\n") -> None:
    print(message, end=end, flush=True)


# ---------------------------------------------------------------------------------------------
# The walk-through


@dataclass
class Fetch:
    status: int
    ok: bool  # 200 and exactly the uploaded bytes
    ms: float
    source: str  # the proxy's `source`: cache | s3 | s3-uncached | synapse | proxy | ?


class ProxyLog:
    """Reads the `request` events media-proxy appends to its log (JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def next_source(self, media_id: str, timeout: float = 3.0) -> str:
        """The source of the next request logged for `media_id` (a worker logs it just after
        the answer went out, so wait for it a little)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            lines = data.split(b"\n")
            for i, line in enumerate(lines[:-1]):  # the last piece may be half written
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "request" and event.get("media_id") == media_id:
                    self.offset += sum(len(x) + 1 for x in lines[: i + 1])
                    return str(event.get("source", "?"))
            if time.monotonic() > deadline:
                return "?"
            time.sleep(0.02)


def fetch(base_url: str, path: str, token: str, expected: bytes) -> tuple[int, bool, float]:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        started = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
        ms = (time.perf_counter() - started) * 1000
    finally:
        conn.close()
    ok = resp.status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    return resp.status, ok, ms


def wait_refilled(stored: Path, data: bytes, timeout: float = 10.0) -> bool:
    """Whether `stored` holds `data` within `timeout` (a fill fsyncs and renames its file
    into place just after it has sent the verified body)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if stored.stat().st_size == len(data) and stored.read_bytes() == data:
                return True
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)


@dataclass
class Row:
    sample: Sample
    media_id: str
    fetches: list[Fetch]
    refilled: bool

    @property
    def ok(self) -> bool:
        return (
            all(f.ok for f in self.fetches)
            and self.refilled
            and [f.source for f in self.fetches] == ["s3", "cache"]
        )


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


def walk_through(stack: DemoStack, token: str) -> list[Row]:
    """Upload the samples, evict them, fetch each twice through nginx; print a table."""
    rows: list[Row] = []
    say(
        f"\n  {'file':12} {'what':25} {'size':>9}   {'1st fetch (evicted)':22}"
        f" {'2nd fetch':22} store"
    )
    for sample in samples():
        uri = stack.synapse.upload(
            token, sample.data, content_type=sample.content_type, filename=sample.name
        )
        media_id = uri.rsplit("/", 1)[1]
        stored = stack.synapse.media_store_path / local_content_key(media_id)
        stored.unlink()  # evicted: S3 holds the only copy now
        path = f"/_matrix/client/v1/media/download/{stack.synapse.server_name}/{media_id}"
        fetches = []
        log = ProxyLog(stack.proxy.log_path)
        refilled = False
        for _ in range(2):
            status, ok, ms = fetch(stack.nginx.url, path, token, sample.data)
            fetches.append(Fetch(status, ok, ms, log.next_source(media_id)))
            # the fill renames its file into place just after the verified last byte
            refilled = wait_refilled(stored, sample.data)
        row = Row(sample, media_id, fetches, refilled)
        rows.append(row)
        cells = [
            f"{f.source:6} {f.ms:8.1f} ms {'ok' if f.ok else f'BAD {f.status}':5}" for f in fetches
        ]
        say(
            f"  {sample.name:12} {sample.what:25} {_size(len(sample.data)):>9}   "
            f"{cells[0]:22} {cells[1]:22} {'refilled' if refilled else 'NOT REFILLED'}"
        )
    say(
        "\n  source (media-proxy's request log): s3 = missing from the store, streamed from S3"
        "\n  while written back; cache = sent from the local store with sendfile."
    )
    return rows


# ---------------------------------------------------------------------------------------------
# The stack


@dataclass
class DemoStack:
    work: Path
    seaweed: SeaweedFS
    synapse: Synapse
    proxy: MediaProxy
    nginx: Nginx


class Progress:
    """Numbered steps, each line finished with its time, or the part that failed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.current = ""

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.done += 1
        self.current = what
        say(f"==> [{self.done}/{self.total}] {what} ... ", end="")
        started = time.monotonic()
        try:
            yield
        except BaseException:
            say("FAILED")
            raise
        say(f"ready ({time.monotonic() - started:.1f} s)")


class Parts:
    """The PIDs of the parts a run started, in <work>/parts.json, so that a later run can
    stop what a killed run left behind (only processes whose command line names the work
    dir: a recycled PID is left alone)."""

    def __init__(self, work: Path) -> None:
        self.path = work / "parts.json"
        self.work = work

    def record(self, name: str, process: ManagedProcess | None) -> None:
        if process is None:
            return
        known = self.read()
        known[name] = process.pid
        self.path.write_text(json.dumps(known))

    def read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return str(self.work).encode() in cmdline

    def alive(self) -> dict[str, int]:
        return {name: pid for name, pid in self.read().items() if self._ours(pid)}

    def stop_leftovers(self) -> None:
        for name, pid in reversed(self.alive().items()):
            say(f"    stopping {name} (pid {pid}) left over by an earlier run")
            sockets = grpc_sockets_of(pid)  # weed leaves these in /tmp when signalled
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self._ours(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while self._ours(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
            remove_stale_sockets(sockets, wait=5.0)
        self.path.unlink(missing_ok=True)


def _running_demo(pid_file: Path) -> int | None:
    """The PID of a demo still running with this work dir, if any."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and b"devstack.demo" in cmdline else None


def start_stack(work: Path, progress: Progress, parts: Parts) -> DemoStack:
    with progress.step("SeaweedFS, the S3 server standing in for Garage"):
        seaweed = SeaweedFS(work / "seaweedfs")
        seaweed.launch()
        parts.record("seaweedfs", seaweed.process)
        seaweed.wait_ready()
        s3 = seaweed.create_bucket("media")
    with progress.step("Synapse (SQLite, synapse-s3-storage-provider)"):
        synapse = Synapse(work / "synapse", s3=s3)
        synapse.launch()
        parts.record("synapse", synapse.process)
        synapse.wait_ready()
    with progress.step(f"media-proxy ({PROXY_WORKERS} workers)"):
        proxy = MediaProxy(
            work / "media-proxy",
            synapse_config=synapse.config_path,
            synapse_url=synapse.url,
            workers=PROXY_WORKERS,
        ).start()
        parts.record("media-proxy", proxy.process)
    with progress.step("nginx in front (nginx/media-proxy.conf)"):
        nginx = Nginx(
            work / "nginx",
            media_proxy=[proxy.url.removeprefix("http://")],
            synapse=synapse.url.removeprefix("http://"),
            server_name=synapse.server_name,
            client_max_body_size=str(synapse.config["max_upload_size"]),
        ).start()
        parts.record("nginx", nginx.process)
    return DemoStack(work, seaweed, synapse, proxy, nginx)


def run(work: Path, *, once: bool) -> int:
    """Everything `scripts/demo` does after setup; returns the exit status."""
    work = work.resolve()
    pid_file = work / "demo.pid"
    other = _running_demo(pid_file)
    if other is not None:
        say(f"a demo is already running with {work} (pid {other}): Ctrl-C it, or use --workdir")
        return 1
    parts = Parts(work)
    parts.stop_leftovers()
    shutil.rmtree(work, ignore_errors=True)  # a re-run starts clean
    work.mkdir(parents=True)
    pid_file.write_text(str(os.getpid()))
    progress = Progress(total=5)
    try:
        stack = start_stack(work, progress, parts)
        with progress.step(f"user @{USER}:{stack.synapse.server_name}"):
            token = stack.synapse.register_user(USER, PASSWORD)
        say("\nUploading samples to Synapse, evicting them, fetching each twice through nginx:")
        rows = walk_through(stack, token)
    except Exception as e:  # a failed part says which and where its log is (StartupError)
        say(f"\ndemo failed at {progress.current!r}: {e}")
        stop_all()
        parts.stop_leftovers()
        pid_file.unlink(missing_ok=True)
        return 1
    ok = all(row.ok for row in rows)
    if not ok:
        say("\nSOMETHING WENT WRONG: see the rows above and the logs under " + str(work))
    if not once:
        show_and_wait(stack, rows)
    say("stopping everything the demo started")
    stop_all()
    parts.stop_leftovers()
    pid_file.unlink(missing_ok=True)
    return 0 if ok else 1


def show_and_wait(stack: DemoStack, rows: list[Row]) -> None:
    sn = stack.synapse.server_name
    example = rows[0].media_id if rows else "MEDIA_ID"
    bucket = stack.synapse.s3.bucket if stack.synapse.s3 else "?"
    info = [
        ("homeserver", f"{stack.nginx.url}  (nginx: point Element or curl here)"),
        ("login", f"@{USER}:{sn}  password {PASSWORD}"),
        ("media-proxy", stack.proxy.url),
        ("synapse", stack.synapse.url),
        ("S3", f"{stack.seaweed.endpoint_url}  bucket {bucket}"),
        ("logs", f"{stack.proxy.log_path}, {stack.synapse.log_path}, {stack.nginx.prefix}/logs/"),
    ]
    say("\nThe stack stays up until Ctrl-C:")
    for key, value in info:
        say(f"  {key:12} {value}")
    say(
        "\n  try:  TOKEN=$(curl -s -XPOST "
        f"{stack.nginx.url}/_matrix/client/v3/login -d "
        f'\'{{"type":"m.login.password","user":"{USER}","password":"{PASSWORD}"}}\''
        " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')"
        f'\n        curl -sI -H "Authorization: Bearer $TOKEN" '
        f"{stack.nginx.url}/_matrix/client/v1/media/download/{sn}/{example}"
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    say("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after the walk-through")
    parser.add_argument(
        "--workdir", type=Path, default=REPO_ROOT / ".demo", help="files and logs (default .demo)"
    )
    args = parser.parse_args(argv)
    return run(args.workdir, once=args.once)


if __name__ == "__main__":
    sys.exit(main())
