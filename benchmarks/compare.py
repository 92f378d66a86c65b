"""One run, one table: media-proxy beside its limits and beside Synapse, driven by `media-proxy
bench` (the library) with the same client for every server.

Starts the real stack on loopback (SeaweedFS, Synapse on SQLite with the S3 provider,
media-proxy, media-proxy in X-Accel mode behind the shipped nginx site, and a plain nginx
serving the media store with `alias`), uploads the media through Synapse, then loads each
server for a few seconds per row:

- nginx static: the limit for hits (sendfile from the store, no auth, no database);
- S3 direct: the limit for misses (presigned GETs straight to SeaweedFS);
- Synapse with the S3 provider, file present and file evicted;
- media-proxy (Python's asyncio loop, the default), the same on uvloop, media-proxy
  behind nginx in X-Accel mode, and behind nginx in fast-hit mode (nginx sends hits alone
  for 5 s after the proxy's yes).

A miss evicts the file from the store before its request (bench's `miss` mode). "x limit" is
the row's key figure over the limit's for the same case (req/s for small hits, MB/s for big
files, TTFB for small misses: below 1 is slower). S3 GETs of the proxies are the GetObject
calls their metrics endpoint (`--metrics-listen`) counted during the row, "S3 wait" the mean
time S3 took to answer them (to the response head, the proxy's own histogram). For a small
miss, TTFB less S3 wait is the proxy's share. SeaweedFS answers GETs paced by a proxy's misses
more slowly than back-to-back ones (measured here: about 0.5 ms back to back, 1.1 to 1.5 ms
after 10 ms idle), so the TTFB row also runs S3 direct at the pace media-proxy's misses
reached: the fair limit to read "S3 direct + 1 ms" against.
Peak RSS is each process's VmHWM at the end of the run. "CPU ms/req" is the user and system
CPU the row's server (its processes and their children: for the proxies behind nginx, both)
spent per request, "S3 CPU" SeaweedFS's: on 2 cores shared with the client, a row can go no
faster than its processes' CPU allows, whatever the design. The client is one Python process
sharing the machine with every server: small-file figures are bounded by it, so compare the
rows of one run, not runs with each other.

    .venv/bin/python -m benchmarks.compare [--seconds 3] [--workers 2] [--json]
        [--case "miss 20 MiB"] [--server media-proxy]   (a part of the table)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from devstack.nginx import Nginx, nginx_binary
from devstack.procs import LOOPBACK, ManagedProcess, free_port, stop_all, stop_on_sigterm
from devstack.proxy import MediaProxy
from devstack.seaweed import SeaweedFS
from devstack.synapse import Synapse
from media_proxy import bench, paths
from media_proxy.bench import Mode, Options, Planner, Target
from media_proxy.config import load

KiB, MiB = 1024, 1024 * 1024
S3_PIDS: tuple[int, ...] = ()  # SeaweedFS, once started
ACCEL_LOCATION = "/_media_proxy_cache/"


@dataclass(frozen=True)
class Case:
    name: str
    key: str  # "rps", "mbps" or "ttfb": the figure the ratio is taken on
    mode: Mode
    files: str  # "small", "big", "many"
    concurrency: int
    requests: int | None = None  # None: run for --seconds


HITS = [
    Case("hit 1 KiB c=1", "rps", "hit", "small", 1),
    Case("hit 1 KiB c=32", "rps", "hit", "small", 32),
    Case("hit 20 MiB c=4", "mbps", "hit", "big", 4),
]
MISSES = [
    Case("miss 1 KiB c=1 (TTFB)", "ttfb", "miss", "small", 1),
    Case("miss 20 MiB c=1", "mbps", "miss", "big", 1),
    Case("32 misses of one 20 MiB file", "mbps", "miss", "big", 32, 32),
    Case("32 misses of 32 20 MiB files", "mbps", "miss", "many", 32, 32),
]


@dataclass
class Server:
    name: str
    url: str
    api: bench.Api
    token: str | None
    evict: Path | None = None  # the store a miss evicts from (None: nothing to evict)
    proxy: MediaProxy | None = None  # whose log counts the S3 GETs
    metrics_url: str | None = None
    presign: Any = None  # S3 direct: target -> presigned URL
    pids: tuple[int, ...] = ()  # the processes (with their children) whose CPU the row counts


def static_nginx(prefix: Path, store: Path) -> tuple[str, ManagedProcess]:
    """nginx with one `location` aliasing the media store: the limit for hits."""
    port = free_port()
    for d in ("conf", "logs", "temp"):
        (prefix / d).mkdir(parents=True, exist_ok=True)
    # Same worker count, sendfile and logging as the shipped nginx.conf (nginx/nginx.conf).
    (prefix / "conf" / "nginx.conf").write_text(
        f"""worker_processes 1;
pid logs/nginx.pid;
error_log logs/error.log;
events {{ worker_connections 512; }}
http {{
    access_log logs/access.log;
    client_body_temp_path temp/client_body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65s;
    server {{
        listen {LOOPBACK}:{port};
        location /store/ {{ alias {store.resolve()}/; }}
    }}
}}
"""
    )
    directives = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    argv = [nginx_binary(), "-p", f"{prefix}/", "-c", str(prefix / "conf" / "nginx.conf")]
    process = ManagedProcess(
        "nginx static", [*argv, "-g", directives], log_path=prefix / "logs" / "nginx.out"
    )
    process.wait_for_port(port, timeout=15)
    return f"http://{LOOPBACK}:{port}/store", process


def start_proxy(
    work: Path,
    name: str,
    synapse: Synapse,
    workers: int,
    *,
    loop: str = "asyncio",
    extra_args: list[str] | None = None,
) -> MediaProxy:
    """A media-proxy in front of `synapse`, JSON logs, on `loop`."""
    return MediaProxy(
        work / name,
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        workers=workers,
        config={"log_format": "json", "event_loop": loop},
        extra_args=extra_args or [],
    ).start()


def front_nginx(
    work: Path, name: str, accel: MediaProxy, synapse: Synapse, *, fast_hits: bool
) -> Nginx:
    """The shipped nginx site in X-Accel mode (and fast-hit mode) in front of `accel`."""
    return Nginx(
        work / name,
        media_proxy=[f"{LOOPBACK}:{accel.port}"],
        synapse=f"{LOOPBACK}:{synapse.port}",
        server_name=synapse.server_name,
        accel_root=synapse.media_store_path,
        fast_hits=fast_hits,
        client_max_body_size="256M",
    ).start()


def with_children(pid: int) -> list[int]:
    """A process and its children (the proxy's supervisor and workers, nginx's master and
    workers)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


def family(pid: int) -> dict[int, int]:
    """VmHWM (peak RSS, KiB) of a process and its children."""
    out: dict[int, int] = {}
    for p in with_children(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[p] = int(line.split()[1])
        except OSError:
            pass
    return out


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User and system CPU seconds of these processes and their children so far."""
    ticks = 0
    for p in (p for pid in pids for p in with_children(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(store: Path, timeout: float = 30.0) -> None:
    """Wait until no fill is running, so a row never inherits the previous row's fills."""
    fill_dir = store / paths.FILL_DIR
    deadline = time.monotonic() + timeout
    while fill_dir.exists() and any(fill_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)


def log_offset(proxy: MediaProxy | None) -> int:
    return proxy.log_path.stat().st_size if proxy is not None else 0


def events_since(proxy: MediaProxy, offset: int) -> list[dict[str, Any]]:
    """The proxy's JSON events logged since `offset` (two workers' events may share a line)."""
    with proxy.log_path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    decoder = json.JSONDecoder()
    events = []
    for line in lines:
        at = 0
        while at < len(line) and line[at] == "{":
            try:
                event, at = decoder.raw_decode(line, at)
            except ValueError:
                break
            events.append(event)
    return events


def problems(events: list[dict[str, Any]]) -> dict[str, int]:
    """Warnings and errors the proxy logged during a row, by event and error."""
    found: dict[str, int] = {}
    for e in events:
        if e.get("level") in ("warning", "error", "critical"):
            key = f"{e.get('event')}: {str(e.get('error') or e.get('cause') or '')[:100]}"
            found[key] = found.get(key, 0) + 1
    return found


async def run_case(
    server: Server,
    case: Case,
    targets: dict[str, list[Target]],
    seconds: float,
    rate: float | None = None,
) -> dict[str, Any]:
    chosen = targets[case.files]
    mode: Mode = case.mode
    if server.presign is not None:
        chosen = [replace(t, url=server.presign(t)) for t in chosen]
        mode = "hit"  # S3 direct: every GET is a read from S3; nothing to evict
    elif mode == "miss" and server.evict is None:
        return {}
    if server.evict is not None:
        settle(server.evict)
    options = Options(
        url=server.url,
        mode=mode,
        token=server.token,
        api=server.api,
        concurrency=case.concurrency,
        duration=None if case.requests else seconds,
        requests=case.requests,
        verify_ratio=0.05,
        evict_store=server.evict if mode == "miss" else None,
        metrics_url=server.metrics_url,
        rate=rate,
    )
    planner = Planner(mode, chosen, chosen if mode == "miss" else (), seed=1)
    offset = log_offset(server.proxy)
    cpu, s3_cpu = cpu_seconds(server.pids), cpu_seconds(S3_PIDS)
    report = await bench.run(options, planner)
    if report["requests"]:
        # CPU per request: the server's own processes, and SeaweedFS's (for S3 direct, the
        # same processes): on 2 shared cores their sum bounds what a row can reach.
        report["cpu_ms_per_request"] = round(
            1000 * (cpu_seconds(server.pids) - cpu) / report["requests"], 2
        )
        report["s3_cpu_ms_per_request"] = round(
            1000 * (cpu_seconds(S3_PIDS) - s3_cpu) / report["requests"], 2
        )
    events = events_since(server.proxy, offset) if server.proxy is not None else []
    if server.presign is not None:
        report["s3_gets"] = report["requests"]
    if problems(events):
        report["proxy_log_problems"] = problems(events)
    return report


def key_figure(case: Case, report: dict[str, Any]) -> float:
    if case.key == "rps":
        return float(report["requests_per_s"])
    if case.key == "mbps":
        return float(report["mb_per_s"])
    return float(report["ttfb_ms"]["p50"])


def ratio(case: Case, report: dict[str, Any], limit: dict[str, Any] | None) -> str:
    if not limit or not report or not report["ok"] or not limit["ok"]:
        return "-"
    mine, theirs = key_figure(case, report), key_figure(case, limit)
    if case.key == "ttfb":
        mine, theirs = theirs, mine  # shorter is better: x limit = limit's time / this time
    return f"{mine / theirs:.2f}" if theirs else "-"


def print_table(rows: list[tuple[Case, str, dict[str, Any], str]]) -> None:
    head = (
        f"{'case':30} {'server':30} {'req/s':>8} {'MB/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'TTFB p50':>9} {'max ms':>8} {'errors':>6} {'S3 GETs':>9} {'x limit':>7}"
        f" {'S3 wait':>7} {'CPU ms/req':>10} {'S3 CPU':>7}"
    )
    print(head)
    print("-" * len(head))
    last = ""
    for case, name, r, x in rows:
        if not r:
            continue
        if case.name != last and last:
            print()
        last = case.name
        errors = r["requests"] - r["ok"]
        print(
            f"{case.name:30} {name:30} {r['requests_per_s']:8.0f} {r['mb_per_s']:8.1f}"
            f" {r['latency_ms']['p50']:8.2f} {r['latency_ms']['p99']:8.2f}"
            f" {r['ttfb_ms']['p50']:9.2f} {r['latency_ms']['max']:8.1f} {errors:6}"
            f" {r['s3_gets']!s:>9} {x:>7} {r.get('s3_get_wait_ms', '-')!s:>7}"
            f" {r.get('cpu_ms_per_request', '-')!s:>10} {r.get('s3_cpu_ms_per_request', '-')!s:>7}"
        )


def main() -> None:
    stop_on_sigterm()  # a benchmark stopped with SIGTERM still stops its servers
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per timed row (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="media-proxy workers (default 2)")
    parser.add_argument("--json", action="store_true", help="every report as JSON lines")
    parser.add_argument(
        "--case", action="append", help="only cases whose name contains this (repeatable)"
    )
    parser.add_argument(
        "--server",
        action="append",
        help="only servers whose name contains this (repeatable; the limits always run)",
    )
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="compare-") as tmp:
        work = Path(tmp)
        try:
            rows, rss = _run(work, args)
        finally:
            stop_all()
    if args.json:
        for case, name, report, x in rows:
            print(json.dumps({"case": case.name, "server": name, "x_limit": x, **report}))
        print(json.dumps({"peak_rss_kib": rss}))
        return
    print(
        f"\nmedia downloads, one bench client (Python, aiohttp), {args.seconds:g} s per timed"
        f" row, {args.workers} media-proxy workers, nginx 1 worker, loopback, {os.cpu_count()}"
        " cores"
    )
    print_table(rows)
    print("\npeak RSS (VmHWM) per process")
    for name, per_pid in rss.items():
        figures = ", ".join(f"{kib / 1024:.1f}" for kib in per_pid.values())
        total = sum(per_pid.values()) / 1024
        print(f"  {name:30} {total:8.1f} MiB  ({len(per_pid)} processes: {figures} MiB)")
    for case, name, r, _ in rows:
        if r and (r["errors"] or r.get("proxy_log_problems")):
            print(f"\n{case.name}, {name}: errors {r['errors']}")
            for what, n in r.get("proxy_log_problems", {}).items():
                print(f"  proxy logged {n} x {what}")
    print(f"\nwhole run {time.monotonic() - started:.0f} s")


def _run(
    work: Path, args: argparse.Namespace
) -> tuple[list[tuple[Case, str, dict[str, Any], str]], dict[str, dict[int, int]]]:
    global S3_PIDS
    seaweed = SeaweedFS(work / "s3").start()
    s3 = seaweed.create_bucket("media")
    assert seaweed.process is not None
    S3_PIDS = (seaweed.process.pid,)
    synapse = Synapse(work / "synapse", s3=s3).start()

    metrics: dict[str, str] = {}

    def media_proxy(name: str, extra_args: list[str], loop: str = "asyncio") -> MediaProxy:
        port = free_port()
        metrics[name] = f"http://{LOOPBACK}:{port}/metrics"
        listen = ["--metrics-listen", f"{LOOPBACK}:{port}"]
        return start_proxy(
            work, name, synapse, args.workers, loop=loop, extra_args=[*extra_args, *listen]
        )

    proxy = media_proxy("proxy", [])
    accel = media_proxy("proxy-accel", ["--accel-redirect", ACCEL_LOCATION])
    other = media_proxy("proxy-uvloop", [], loop="uvloop")
    nginx = front_nginx(work, "nginx-accel", accel, synapse, fast_hits=False)
    fast = front_nginx(work, "nginx-fast", accel, synapse, fast_hits=True)
    static_url, static = static_nginx(work / "nginx-static", synapse.media_store_path)
    token = synapse.register_user("bench", "bench-password")

    def up(data: bytes, name: str) -> tuple[str, str]:
        uri = synapse.upload(token, data, content_type="application/octet-stream", filename=name)
        server, _, media_id = uri.removeprefix("mxc://").partition("/")
        return server, media_id

    small = [up(os.urandom(KiB), "small.bin")]
    many = [up(os.urandom(20 * MiB), f"big{i}.bin") for i in range(32)]
    config = load(synapse_config=[synapse.config_path], need_synapse_url=False)
    all_targets = asyncio.run(bench.enrich(config, small + many))
    targets = {"small": all_targets[:1], "big": all_targets[1:2], "many": all_targets[1:]}
    client = seaweed.client()

    def presign(t: Target) -> str:
        url: str = client.generate_presigned_url(
            "get_object", Params={"Bucket": s3.bucket, "Key": s3.prefix + t.rel}, ExpiresIn=3600
        )
        return url

    assert synapse.process and proxy.process and accel.process and nginx.process and other.process
    assert fast.process
    store = synapse.media_store_path
    servers = {
        "nginx static": Server("nginx static", static_url, "store", None, pids=(static.pid,)),
        "S3 direct": Server(
            "S3 direct", s3.endpoint_url, "store", None, presign=presign, pids=S3_PIDS
        ),
        "Synapse": Server(
            "Synapse", synapse.url, "client", token, evict=store, pids=(synapse.process.pid,)
        ),
        "media-proxy": Server(
            "media-proxy",
            proxy.url,
            "client",
            token,
            evict=store,
            proxy=proxy,
            pids=(proxy.process.pid,),
        ),
        "media-proxy (uvloop)": Server(
            "media-proxy (uvloop)",
            other.url,
            "client",
            token,
            evict=store,
            proxy=other,
            pids=(other.process.pid,),
        ),
        "media-proxy + nginx X-Accel": Server(
            "media-proxy + nginx X-Accel",
            nginx.url,
            "client",
            token,
            evict=store,
            proxy=accel,
            pids=(accel.process.pid, nginx.process.pid),
        ),
        "media-proxy + nginx fast hits": Server(
            "media-proxy + nginx fast hits",
            fast.url,
            "client",
            token,
            evict=store,
            proxy=accel,
            pids=(accel.process.pid, fast.process.pid),
        ),
    }
    servers["media-proxy"].metrics_url = metrics["proxy"]
    servers["media-proxy + nginx X-Accel"].metrics_url = metrics["proxy-accel"]
    servers["media-proxy (uvloop)"].metrics_url = metrics["proxy-uvloop"]
    servers["media-proxy + nginx fast hits"].metrics_url = metrics["proxy-accel"]

    async def all_rows() -> list[tuple[Case, str, dict[str, Any], str]]:
        rows = []
        for cases, limit_name in ((HITS, "nginx static"), (MISSES, "S3 direct")):
            for case in cases:
                if args.case and not any(c in case.name for c in args.case):
                    continue
                limit = await run_case(servers[limit_name], case, targets, args.seconds)
                rows.append((case, limit_name, limit, "1.00" if limit else "-"))
                for name, server in servers.items():
                    if name in ("nginx static", "S3 direct"):
                        continue
                    if args.server and not any(n in name for n in args.server):
                        continue
                    report = await run_case(server, case, targets, args.seconds)
                    rows.append((case, name, report, ratio(case, report, limit)))
                    if case.key == "ttfb" and name == "media-proxy" and report.get("ok"):
                        paced = await run_case(
                            servers[limit_name],
                            case,
                            targets,
                            args.seconds,
                            rate=report["requests_per_s"],
                        )
                        rows.append(
                            (case, f"{limit_name}, proxy's pace", paced, ratio(case, paced, limit))
                        )
        return rows

    rows = asyncio.run(all_rows())
    me = os.getpid()
    rss = {
        "bench client (this process)": {me: family(me)[me]},
        "SeaweedFS": family(seaweed.process.pid) if seaweed.process else {},
        "Synapse": family(synapse.process.pid),
        "media-proxy": family(proxy.process.pid),
        "media-proxy (X-Accel)": family(accel.process.pid),
        "media-proxy (uvloop)": family(other.process.pid),
        "nginx (X-Accel, shipped site)": family(nginx.process.pid),
        "nginx (fast hits, shipped site)": family(fast.process.pid),
        "nginx static": family(static.pid),
    }
    static.stop()
    return rows, rss


if __name__ == "__main__":
    main()
