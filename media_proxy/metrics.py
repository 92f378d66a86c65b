"""Operations: Prometheus metrics summed across worker processes, and the readiness answer.

Metrics are off unless `metrics_listen` is set. `enable` (called by `serve` before it forks)
switches prometheus_client to its multiprocess mode over a fresh private directory: every
worker writes its own counters to mmap'ed files there, and every worker also listens on the
metrics address (SO_REUSEPORT) and answers a scrape by merging all the files, so any worker
gives the same sums. The supervisor calls `process_dead` for a worker that exited (its live
gauges go; its counters stay, as a Prometheus counter must never go down).

The hooks below are what the serving code calls; each is a no-op while metrics are off.
Names follow Synapse's: `<app>_<subsystem>_<what>_<unit>`, counters ending in `_total`.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, TypeVar

from aiohttp import web
from botocore.exceptions import ClientError

T = TypeVar("T")

METRICS_PATH: Final = "/metrics"
_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# Latency buckets (seconds): S3 answers in milliseconds when healthy, seconds when not.
_S3_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REQUEST_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0)


class _Metrics:
    """The metric objects; built only once multiprocess mode is on (see `enable`)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, registry=None)

        self.requests = counter(
            "media_proxy_requests",
            "Requests answered, by route kind, where the bytes came from, and status.",
            ("kind", "source", "status"),
        )
        self.sent_bytes = counter(
            "media_proxy_sent_bytes", "Response body bytes sent, by source.", ("source",)
        )
        self.request_duration = Histogram(
            "media_proxy_request_duration_seconds",
            "Time from a request's arrival to its last byte, by source.",
            ("source",),
            buckets=_REQUEST_BUCKETS,
            registry=None,
        )
        self.aborted = counter(
            "media_proxy_responses_aborted",
            "Responses cut off after they started, by cause (client, s3, synapse, error...).",
            ("cause",),
        )
        self.s3_requests = counter(
            "media_proxy_s3_requests",
            "S3 calls by method and outcome (ok, not_found, timeout, connection, cancelled,"
            " or S3's error code).",
            ("method", "outcome"),
        )
        self.s3_duration = Histogram(
            "media_proxy_s3_request_duration_seconds",
            "Time S3 took to answer a call (GetObject: to the response head), by method.",
            ("method",),
            buckets=_S3_BUCKETS,
            registry=None,
        )
        self.s3_connections_opened = counter(
            "media_proxy_s3_connections_opened",
            "Connections opened to S3 for the proxy's own GETs and listings (kept alive"
            " between them).",
        )
        self.s3_breaker_refused = counter(
            "media_proxy_s3_breaker_refused",
            "GetObject calls not made because the circuit breaker was open.",
        )
        self.s3_breaker_opened = counter(
            "media_proxy_s3_breaker_opened", "Times a worker's S3 circuit breaker opened."
        )
        self.fills_started = counter(
            "media_proxy_fills_started", "Fills from S3 this proxy led (one S3 GET each)."
        )
        self.fills_joined = counter(
            "media_proxy_fills_joined",
            "Clients that joined a fill already running, led by the same worker or another"
            " process (coalesced waiters).",
            ("leader",),
        )
        self.fills_in_flight = Gauge(
            "media_proxy_fills_in_flight",
            "Fills being led now, summed over live workers.",
            multiprocess_mode="livesum",
            registry=None,
        )
        self.cache_lookups = counter(
            "media_proxy_cache_lookups",
            "Lookups in the in-process caches (auth, local_media, remote_media), by result.",
            ("cache", "result"),
        )
        self.evicted_files = counter(
            "media_proxy_evicted_files", "Files the background evictor deleted."
        )
        self.evicted_bytes = counter(
            "media_proxy_evicted_bytes", "Bytes the background evictor deleted."
        )
        self._store_bytes: Any = None
        self._walk_seconds: Any = None

    def walk_seconds(self, seconds: float) -> None:
        if self._walk_seconds is None:  # as store_bytes: the evictor's process only
            from prometheus_client import Gauge

            self._walk_seconds = Gauge(
                "media_proxy_evictor_walk_seconds",
                "Seconds the evictor's last budget walk of the store took (passes are spaced"
                " so that walking stays a tenth of the time).",
                multiprocess_mode="livemax",
                registry=None,
            )
        self._walk_seconds.set(seconds)

    def store_bytes(self, size: int) -> None:
        # Created by the worker running the evictor only: no sample until the size is known.
        if self._store_bytes is None:
            from prometheus_client import Gauge

            self._store_bytes = Gauge(
                "media_proxy_store_bytes",
                "Bytes in the cache after the evictor's last pass.",
                multiprocess_mode="livemax",
                registry=None,
            )
        self._store_bytes.set(size)


_m: _Metrics | None = None
_dir: str | None = None


def enable() -> str:
    """Turn metrics on for this process and the workers it forks; returns the fresh private
    directory the workers write to (see `disable`)."""
    global _m, _dir
    _dir = tempfile.mkdtemp(prefix="media-proxy-metrics-")
    os.environ[_ENV] = _dir
    from prometheus_client import values

    # The value class is chosen from the environment when prometheus_client is imported,
    # which may have happened before the directory existed.
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _m = _Metrics()
    atexit.register(disable)  # workers leave by os._exit: only this process cleans up
    return _dir


def disable() -> None:
    """Remove the directory `enable` made (the supervisor, at its exit)."""
    global _m, _dir
    if _dir is not None:
        shutil.rmtree(_dir, ignore_errors=True)
    _m, _dir = None, None


def process_dead(pid: int) -> None:
    """A worker exited: drop its live gauges (its counters stay in the sums)."""
    if _dir is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, _dir)  # type: ignore[no-untyped-call]


def render() -> bytes:
    """The exposition text, merged from every worker's files (blocking file reads)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, _dir)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


async def start_listener(host: str, port: int, *, reuse_port: bool) -> web.AppRunner:
    """Serve GET /metrics on its own address (never behind the public nginx)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    async def scrape(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(render)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get(METRICS_PATH, scrape)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_port=reuse_port).start()
    return runner


# --- hooks ------------------------------------------------------------------------------------


def request(
    *,
    kind: str,
    source: str,
    status: int | None,
    bytes: int | None,
    seconds: float,
    aborted: str | None,
) -> None:
    """One answered request: the same values as its `request` log event."""
    if _m is None:
        return
    _m.requests.labels(kind, source, str(status) if status is not None else "none").inc()
    if bytes:
        _m.sent_bytes.labels(source).inc(bytes)
    _m.request_duration.labels(source).observe(seconds)
    if aborted:
        _m.aborted.labels(aborted).inc()


def s3_outcome(error: BaseException | None) -> str:
    """A bounded label for how an S3 call ended."""
    if error is None:
        return "ok"
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", "unknown"))
        return "not_found" if code in ("404", "NoSuchKey", "NotFound") else code
    if isinstance(error, asyncio.CancelledError):
        return "cancelled"  # given up on: the caller's deadline, or a shutdown
    if isinstance(error, TimeoutError):
        return "timeout"
    return "connection"


async def s3_call(method: str, call: Awaitable[T]) -> T:
    """Await one S3 call, counting it and timing it by method and outcome."""
    if _m is None:
        return await call
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        return await call
    except BaseException as e:
        error = e
        raise
    finally:
        _m.s3_duration.labels(method).observe(time.perf_counter() - started)
        _m.s3_requests.labels(method, s3_outcome(error)).inc()


def s3_connection_opened() -> None:
    if _m is not None:
        _m.s3_connections_opened.inc()


def s3_breaker_refused() -> None:
    if _m is not None:
        _m.s3_breaker_refused.inc()


def s3_breaker_opened() -> None:
    if _m is not None:
        _m.s3_breaker_opened.inc()


def fill_started(in_flight: int) -> None:
    if _m is not None:
        _m.fills_started.inc()
        _m.fills_in_flight.set(in_flight)


def fill_joined(*, same_worker: bool) -> None:
    if _m is not None:
        _m.fills_joined.labels("same_worker" if same_worker else "other_process").inc()


def fills_in_flight(n: int) -> None:
    if _m is not None:
        _m.fills_in_flight.set(n)


def cache_lookup(cache: str, *, hit: bool) -> None:
    if _m is not None:
        _m.cache_lookups.labels(cache, "hit" if hit else "miss").inc()


def evicted(files: int, size: int) -> None:
    if _m is not None and files:
        _m.evicted_files.inc(files)
        _m.evicted_bytes.inc(size)


def store_size(size: int) -> None:
    if _m is not None:
        _m.store_bytes(size)


def evictor_walk(seconds: float) -> None:
    if _m is not None:
        _m.walk_seconds(seconds)


# --- readiness --------------------------------------------------------------------------------

READY_CACHE_S: Final = 2.0  # a load balancer polling every second costs S3 one call per 2 s
PROBE_TIMEOUT_S: Final = 3.0

Probe = Callable[[], Awaitable[object]]


async def _probe(check: Probe) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await check()
    except TimeoutError:
        error: str | None = f"no answer in {PROBE_TIMEOUT_S:g} s"
    except Exception as e:  # any failure means "not ready"; the reason goes in the answer
        error = str(e) or type(e).__name__
    else:
        error = None
    ms = round((time.perf_counter() - started) * 1000)
    part: dict[str, Any] = {"ok": error is None, "ms": ms}
    if error is not None:
        part["error"] = error
    return part


class Readiness:
    """`/_media_proxy/ready`: can this worker serve (S3, database and Synapse answer)?

    Answers are kept `READY_CACHE_S` seconds, and concurrent asks share one round of probes.
    """

    def __init__(
        self,
        probes: Mapping[str, Probe],
        extra: Callable[[], dict[str, Any]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probes = dict(probes)
        self._extra = extra
        self._clock = clock
        self._answer: tuple[float, bool, dict[str, Any]] | None = None
        self._running: asyncio.Future[tuple[bool, dict[str, Any]]] | None = None

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body)."""
        now = self._clock()
        if self._answer is not None and now - self._answer[0] < READY_CACHE_S:
            return self._answer[1], self._answer[2]
        if self._running is None:
            self._running = asyncio.ensure_future(self._run())
            self._running.add_done_callback(lambda _: setattr(self, "_running", None))
        return await asyncio.shield(self._running)

    async def _run(self) -> tuple[bool, dict[str, Any]]:
        names = list(self._probes)
        parts = await asyncio.gather(*(_probe(self._probes[n]) for n in names))
        body: dict[str, Any] = dict(zip(names, parts, strict=True))
        ready = all(p["ok"] for p in parts)
        body.update(self._extra())
        body["ready"] = ready
        self._answer = (self._clock(), ready, body)
        return ready, body

    async def respond(self) -> web.Response:
        ready, body = await self.check()
        return web.json_response(body, status=200 if ready else 503)
