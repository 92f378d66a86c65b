"""The aiohttp server: wires the pipeline together, logs one event per request, runs workers.

Every request goes through `Proxy.handle`: a download of local media the proxy can answer
goes down the media pipeline; everything else, and anything the pipeline is unsure of,
is passed to Synapse. Several worker processes share the port (SO_REUSEPORT) and the cache;
fill.py keeps them to one S3 GET per file.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Final

import structlog
from aiohttp import web

from media_proxy import connection, logs, metrics, parse, respond
from media_proxy import headers as h
from media_proxy.authorize import Authorizer
from media_proxy.config import Config
from media_proxy.evict import BackgroundEvictor
from media_proxy.fill import Filler
from media_proxy.lifecycle import BackgroundPruner
from media_proxy.locate import Locator
from media_proxy.metadata import Metadata, open_database
from media_proxy.parse import Api, Kind
from media_proxy.passthrough import SynapseClient
from media_proxy.pipeline import MediaPipeline, Outcome
from media_proxy.pipeline.steps import DECIDE, DECIDE_HEADER, Undecided
from media_proxy.respond import Aborted, Refused, abort
from media_proxy.respond import started as started_response
from media_proxy.s3 import S3

log = structlog.get_logger("media_proxy")

HEALTH_PATH: Final = "/_media_proxy/health"
READY_PATH: Final = "/_media_proxy/ready"
_CRASH_LOOP_S: Final = 5.0
_STOP_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})


class Proxy:
    """All long-lived parts of one worker process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.synapse: SynapseClient | None = None
        self.s3: S3 | None = None
        self.filler: Filler | None = None
        self.metadata: Metadata | None = None
        self.pipeline: MediaPipeline | None = None
        self.readiness: metrics.Readiness | None = None
        self.metrics_listener: web.AppRunner | None = None
        # Ids of requests that come without X-Request-ID: 16 hex digits, as os.urandom(8)
        # gave, but a getrandom() system call per request is needless: a random prefix
        # per process (made in the worker, after the fork) and a count.
        self._id_prefix = os.urandom(4).hex()
        self._ids = itertools.count()

    async def start(self) -> None:
        """Build the long-lived parts inside the worker's event loop."""
        config = self.config
        self.synapse = SynapseClient(
            config.synapse_url,
            connect_timeout=config.synapse_connect_timeout,
            read_timeout=config.synapse_read_timeout,
            max_connections=config.synapse_max_connections,
        )
        db = await open_database(config.database)
        self.metadata = Metadata(
            db,
            ttl=config.metadata_cache_ttl,
            maxsize=config.metadata_cache_size,
            flush_interval=config.access_flush_interval,
            timeout=config.database_timeout,
        )
        await self.metadata.start()
        if config.s3 is not None:
            self.s3 = S3(config.s3)
            await self.s3.start()
            self.filler = Filler(
                config.cache_path,
                self.s3,
                chunk_size=config.s3_chunk_size,
                max_fills=config.max_fills,
                max_fills_per_client=config.max_fills_per_client,
                fill_wait=config.fill_wait,
            )
        authorizer = Authorizer(
            self.synapse,
            ttl=config.auth_cache_ttl,
            failure_ttl=config.auth_failure_ttl,
            maxsize=config.auth_cache_size,
        )
        locator = Locator(config.cache_path, self.filler, s3_unavailable=config.s3_unavailable)
        self.pipeline = MediaPipeline(config, authorizer, self.metadata, locator)
        self.readiness = self._readiness()
        if config.metrics_listen is not None:
            self.metrics_listener = await metrics.start_listener(
                *config.metrics_listen, reuse_port=config.workers > 1
            )

    def _readiness(self) -> metrics.Readiness:
        """/ready's parts: S3 (if configured), the database and Synapse must answer."""
        s3, metadata, synapse = self.s3, self.metadata, self._synapse()
        assert metadata is not None
        probes: dict[str, metrics.Probe] = {}
        if s3 is not None:
            probes["s3"] = s3.check_bucket
        probes["database"] = metadata.ping
        probes["synapse"] = synapse.health
        return metrics.Readiness(
            probes, lambda: {"s3_breaker": s3.breaker.state} if s3 is not None else {}
        )

    async def close(self) -> None:
        if self.metrics_listener is not None:
            await self.metrics_listener.cleanup()
        if self.filler is not None:
            await self.filler.close()
        if self.metadata is not None:
            await self.metadata.close()
        if self.s3 is not None:
            await self.s3.close()
        if self.synapse is not None:
            await self.synapse.close()

    def _request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):08x}"

    def _synapse(self) -> SynapseClient:
        assert self.synapse is not None, "start() first"
        return self.synapse

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer one request: the media pipeline when it can be exact, else Synapse.

        Once a response has started, any failure aborts the connection (never a second
        answer on the same one); before that, an unexpected error falls back to Synapse.
        """
        started = time.perf_counter()
        outcome = Outcome()
        media = parse.parse(request.method, request.raw_path)
        response: web.StreamResponse | None = None
        aborted: str | None = None
        try:
            response = await self._answer(request, media, outcome)
            return response
        except Aborted as e:
            aborted = e.cause
            response = self._abort(request)
            if e.cause != "client":
                log.warning("response.aborted", cause=e.cause, error=str(e), path=request.path)
            return response
        except Exception as e:
            if started_response(request) is not None:
                aborted = "error"
                log.error("response.aborted", cause="error", error=repr(e), path=request.path)
                response = self._abort(request)
                return response
            log.exception("request.error", path=request.path)
            if request.get(DECIDE):  # nginx's question is never Synapse's to answer: a no
                outcome.source = "proxy"
                response = web.Response(status=204)
                return response
            outcome.source = "synapse"
            try:
                response = await self._synapse().forward(request)
            except Aborted as gone:
                aborted = gone.cause
                response = self._abort(request)
            return response
        except asyncio.CancelledError:  # the stop's grace period is over
            aborted = "shutdown"
            raise
        finally:
            sending = started_response(request)
            if response is None and sending is not None:
                response = sending.response  # its status went out
            # counted before the event is logged: a test that saw the event sees the count
            metrics.request(
                kind=f"{media.api.value}-{media.kind.value}" if media else "other",
                source=outcome.source,
                status=response.status if response is not None else None,
                bytes=sending.sent if sending is not None else outcome.bytes,
                seconds=time.perf_counter() - started,
                aborted=aborted,
            )
            logs.info(
                "request",
                {
                    "request_id": request.headers.get("X-Request-ID") or self._request_id(),
                    "method": request.method,
                    "path": request.path,  # never the query: it may carry an access token
                    "route": f"{media.api.value}-{media.kind.value}" if media else "other",
                    "media_id": media.media_id if media else None,
                    "source": outcome.source,
                    "status": response.status if response is not None else None,
                    "bytes": sending.sent if sending is not None else outcome.bytes,
                    "ms": round((time.perf_counter() - started) * 1000, 2),
                    **({"aborted": aborted} if aborted else {}),
                    **({"decide": True} if request.get(DECIDE) else {}),
                },
            )

    async def _answer(
        self, request: web.Request, media: parse.MediaRequest | None, outcome: Outcome
    ) -> web.StreamResponse:
        if request.path == HEALTH_PATH:
            outcome.source = "proxy"
            return web.json_response({"status": "ok"})
        if request.path == READY_PATH and self.readiness is not None:
            outcome.source = "proxy"
            return await self.readiness.respond()
        response: web.StreamResponse | None = None
        if DECIDE_HEADER in request.headers and self.config.accel_redirect:
            # nginx's fast-hit question (its own subrequest: never Synapse's to answer)
            outcome.source = "proxy"
            request[DECIDE] = True
            if (
                request.headers[DECIDE_HEADER] != "1"  # nginx saw Range or a conditional
                or media is None
                or media.api is Api.FEDERATION
                or self.pipeline is None
            ):
                return web.Response(status=204)
            try:
                answer = await self.pipeline.serve(request, media, outcome)
            except (Undecided, Refused):
                answer = None
            if answer is None:
                outcome.source = "proxy"
                return web.Response(status=204)
            return answer
        if media is not None and self.pipeline is not None:
            try:
                response = await self.pipeline.serve(request, media, outcome)
            except Refused as e:
                outcome.source = "proxy"
                return await self._refuse(request, media, e)
        if response is None:
            outcome.source = "synapse"
            response = await self._synapse().forward(request)
        return response

    @staticmethod
    async def _refuse(
        request: web.Request, media: parse.MediaRequest, refused: Refused
    ) -> web.StreamResponse:
        """An error the proxy gives itself, with the headers of the servlet asked."""
        servlet = h.servlet_headers(download=media.kind is Kind.DOWNLOAD)
        if refused.retry_after_ms is not None:
            seconds = -(-refused.retry_after_ms // 1000)
            servlet = [*servlet, ("Retry-After", str(seconds))]
        return await respond.error(request, refused.status, refused.body(), servlet)

    @staticmethod
    def _abort(request: web.Request) -> web.StreamResponse:
        """Close the connection at once; the started response (if any) goes back to aiohttp,
        whose attempt to finish it fails quietly on the closed transport."""
        abort(request)
        sending = started_response(request)
        return sending.response if sending is not None else web.Response(status=499)


def make_app(config: Config) -> tuple[web.Application, connection.Handler]:
    """The app (its hooks start and close the proxy) and the handler of every request."""
    app = web.Application(client_max_size=config.max_upload_size + 1024 * 1024)
    proxy = Proxy(config)

    async def on_startup(_: web.Application) -> None:
        await proxy.start()

    async def on_cleanup(_: web.Application) -> None:
        await proxy.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app, proxy.handle


def _stop_signals() -> tuple[asyncio.Event, list[str]]:
    """An event the first stop signal (SIGTERM, SIGINT) sets, and the names of those received.
    They arrive blocked (see `serve`) and are unblocked once this loop handles them."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stopped.set()

    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    return stopped, received


def _run_worker(config: Config, *, reuse_port: bool) -> str:
    """Serve until SIGTERM or SIGINT, then shut down once; return the signal's name.

    A stop often reaches a worker twice (Ctrl-C and `systemctl stop` signal the whole process
    group, and the supervisor passes the stop on): aiohttp's `run_app` raises `GracefulExit`
    on each signal, so a second one broke its clean-up with a traceback. Here a signal only
    sets an event. Stop signals arrive blocked (see `serve`) and are unblocked once the loop
    handles them, so one sent during start-up is a clean stop too.
    """

    async def run() -> str:
        stopped, received = _stop_signals()
        app, handler = make_app(config)
        runner = connection.Runner(  # request heads read as Synapse's Twisted does
            app,
            handler=handler,
            access_log=None,
            handler_cancellation=False,
            shutdown_timeout=config.shutdown_grace,  # then running handlers are cancelled
            keepalive_timeout=75,
        )
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, config.listen_host, config.listen_port, reuse_port=reuse_port
            )
            await site.start()
            await stopped.wait()
        finally:
            await runner.cleanup()
        return received[0]

    with asyncio.Runner(loop_factory=loop_factory(config)) as runner:
        return runner.run(run())


def loop_factory(config: Config) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop for serving workers when configured (respond.py brings the sendfile waits it
    lacks). Not the default: side by side (benchmarks.hits, benchmarks.compare) it served
    hits no faster than Python's loop, whose own sendfile is the longer-proven path."""
    if config.event_loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def serve(config: Config) -> int:
    """Run the server in the foreground until SIGTERM or SIGINT."""
    # Held until a handler is in place (`_run_worker`, `_supervise`): a stop during start-up
    # is then a clean stop, not a KeyboardInterrupt.
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    if config.metrics_listen is not None:
        metrics.enable()  # before the workers fork: they inherit multiprocess mode
    if config.s3 is not None:
        config.cache_path.mkdir(parents=True, exist_ok=True)
        removed = Filler(config.cache_path, S3(config.s3), chunk_size=1).prepare()
        if removed:
            log.info("cache_fill.stale_removed", count=removed)
    log.info(
        "server.start",
        listen=f"{config.listen_host}:{config.listen_port}",
        workers=config.workers,
        metrics_listen=":".join(map(str, config.metrics_listen or ())) or None,
        server_name=config.server_name,
        cache_path=str(config.cache_path),
        synapse_url=config.synapse_url,
        s3_bucket=config.s3.bucket if config.s3 else None,
    )
    if config.workers == 1 and not _wants_upkeep(config):
        log.info("server.stop", signal=_run_worker(config, reuse_port=False))
        return 0
    return _supervise(config)


# The supervisor's slot for the background upkeep process (workers have 0..N-1).
_UPKEEP_SLOT: Final = -1


def _wants_upkeep(config: Config) -> bool:
    """Whether a background task is configured: the evictor (`cache_max_size`) or the
    bucket's pruner (`s3_prune_interval`)."""
    return config.s3 is not None and (
        config.cache_max_size is not None or config.s3_prune_interval is not None
    )


def _run_upkeep(config: Config) -> str:
    """The background evictor and S3 pruner, in a process of their own: store walks, bucket
    listings and database joins never stall a serving loop. Returns the stop signal's name."""

    async def run() -> str:
        assert config.s3 is not None
        structlog.contextvars.bind_contextvars(process="upkeep")
        stopped, received = _stop_signals()
        s3 = S3(config.s3)
        await s3.start()
        tasks: list[BackgroundEvictor | BackgroundPruner] = []
        if config.cache_max_size is not None:
            tasks.append(BackgroundEvictor(config, s3))
        if config.s3_prune_interval is not None:
            tasks.append(BackgroundPruner(config, s3))
        try:
            for task in tasks:
                await task.start()
            await stopped.wait()
        finally:
            for task in tasks:
                await task.close()
            await s3.close()
        return received[0]

    return asyncio.run(run())


def _supervise(config: Config) -> int:
    """Fork the workers, restart any that die, and pass stop signals on to them.

    Exit status 0 means a signal asked for the stop and every worker then exited cleanly.
    """
    children: dict[int, int] = {}
    started_at: dict[int, float] = {}
    received: list[str] = []
    failed = False

    def spawn(slot: int) -> None:
        # The child starts with stop signals blocked (serve blocked them; the parent's handler
        # must never run in a worker); `_run_worker` unblocks them once its loop handles them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if slot == _UPKEEP_SLOT:
                    _run_upkeep(config)
                else:
                    _run_worker(config, reuse_port=True)
                code = 0
            except BaseException:
                log.exception("worker.crashed")
            finally:
                logs.flush()  # os._exit skips atexit
                os._exit(code)
        children[pid] = slot
        started_at[pid] = time.monotonic()

    def stop_workers() -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop_workers()

    for sig in _STOP_SIGNALS:
        signal.signal(sig, on_signal)
    for slot in range(config.workers):
        spawn(slot)
    if _wants_upkeep(config):
        spawn(_UPKEEP_SLOT)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if pid not in children:
            continue
        slot = children.pop(pid)
        metrics.process_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if received or failed:
            if code != 0:
                failed = True
                log.warning("worker.died", pid=pid, status=code)
            continue
        log.warning("worker.died", pid=pid, status=code)
        lived = time.monotonic() - started_at.pop(pid)
        if code >= 0 and lived < _CRASH_LOOP_S:
            # exiting right after start is a set-up problem, not bad luck: stop the others
            # (a worker killed by a signal, OOM killer or kill -9, is just restarted)
            failed = True
            stop_workers()
            continue
        spawn(slot)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    if received:
        log.info("server.stop", signal=received[0])
    return 1 if failed else 0


def main_asyncio_policy() -> None:
    """Python's own loop policy: serving workers choose their loop themselves (`event_loop`)."""
    if sys.platform != "linux":
        raise SystemExit("media-proxy: Linux is required (flock, sendfile, SO_REUSEPORT)")
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
