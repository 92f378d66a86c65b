"""Start, watch and stop the child processes of the dev stack.

Every part (SeaweedFS, PostgreSQL, Synapse) runs as a child process whose stdout and stderr go
to a log file in its work dir, so that a part that fails to start can be explained by quoting
the end of its log. Processes are stopped by PID only, and an ``atexit`` hook stops whatever is
still running when the interpreter exits, so a crashed test run leaves nothing behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final, Self

LOOPBACK: Final = "127.0.0.1"

# Ports are picked below the kernel's ephemeral range, so that an outgoing connection can never
# be handed a port between the moment we pick it and the moment the server binds it.
_PORT_FLOOR: Final = 10000
_TAIL_LINES: Final = 30
_POLL_INTERVAL: Final = 0.1

# Loopback requests must never go through a proxy configured in the environment.
_DIRECT: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_lock = threading.Lock()
_reserved: set[int] = set()
_live: dict[int, ManagedProcess] = {}


class StartupError(RuntimeError):
    """A part did not become ready; the message names it, its log file and the log's tail."""


def _ephemeral_floor() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _can_bind(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(*, also_free: Sequence[int] = ()) -> int:
    """Return a loopback TCP port that is free now and not handed out before by this process.

    ``also_free`` lists offsets whose ports must be free too: SeaweedFS listens for gRPC on
    each HTTP port + 10000, so it asks for ``free_port(also_free=(10000,))``.
    """
    top = max((0, *also_free))
    ceiling = _ephemeral_floor() - top
    if ceiling <= _PORT_FLOOR + 100:
        ceiling = 65536 - top
    for _ in range(500):
        port = random.randrange(_PORT_FLOOR, ceiling)
        ports = [port + offset for offset in (0, *also_free)]
        with _lock:
            if any(p in _reserved for p in ports):
                continue
            if all(_can_bind(p) for p in ports):
                _reserved.update(ports)
                return port
    raise RuntimeError(f"no free loopback port found (offsets {list(also_free)})")


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a log file ("" if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def http_status(url: str, *, timeout: float = 2.0) -> int:
    """GET ``url`` directly (no proxy) and return the status; raises OSError if nobody answers."""
    try:
        with _DIRECT.open(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as err:
        return err.code


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """True if something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class ManagedProcess:
    """One child process with its log file; knows how to wait for it and how to stop it."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
        stop_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.argv = [os.fspath(a) for a in argv]
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.stop_timeout = stop_timeout
        child_env = dict(os.environ if env is None else env)
        for key in ("NO_PROXY", "no_proxy"):
            child_env[key] = ",".join(filter(None, [child_env.get(key), "127.0.0.1,localhost"]))
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            log.write(f"=== {time.strftime('%F %T')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            # A new session keeps a terminal's Ctrl-C away from the children: they are stopped
            # in order by stop(), not all at once by the signal.
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=child_env,
                user=user,
                group=user,
                extra_groups=[] if user is not None else None,
                start_new_session=True,
            )
        self.pid = self.popen.pid
        with _lock:
            _live[self.pid] = self

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def describe(self, problem: str) -> str:
        """An error message naming the part, the problem, the log file and the log's tail."""
        return (
            f"{self.name} (pid {self.pid}) {problem}; log {self.log_path}, last lines:\n"
            f"{tail(self.log_path)}"
        )

    def wait_until(self, check: Callable[[], bool], *, what: str, timeout: float) -> None:
        """Poll ``check`` until it returns True; exceptions count as "not yet".

        Raises StartupError if the process exits first or the deadline passes.
        """
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            if not self.running:
                raise StartupError(
                    self.describe(f"exited with code {self.popen.returncode} before {what}")
                )
            try:
                if check():
                    return
            except Exception as err:
                last_error = err
            if time.monotonic() > deadline:
                hint = f" (last error: {last_error!r})" if last_error else ""
                raise StartupError(
                    self.describe(f"did not reach {what} within {timeout:.0f} s{hint}")
                )
            time.sleep(_POLL_INTERVAL)

    def wait_for_port(self, port: int, *, timeout: float, host: str = LOOPBACK) -> None:
        """Wait until ``host:port`` accepts TCP connections."""
        self.wait_until(
            lambda: port_open(port, host), what=f"listening on {host}:{port}", timeout=timeout
        )

    def wait_for_http(
        self, url: str, *, timeout: float, ok: Callable[[int], bool] = lambda s: s == 200
    ) -> None:
        """Wait until a GET of ``url`` answers with a status accepted by ``ok``."""
        self.wait_until(lambda: ok(http_status(url)), what=f"answering {url}", timeout=timeout)

    def stop(self, timeout: float | None = None) -> int | None:
        """Send the stop signal, then SIGKILL after ``timeout``; return the exit code."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait()
        with _lock:
            _live.pop(self.pid, None)
        return self.popen.returncode


class Part:
    """A dev-stack part with one process: `launch` it, `wait_ready`, or both with `start`."""

    process: ManagedProcess | None = None
    start_timeout: float = 60.0

    def launch(self) -> None:
        raise NotImplementedError

    def wait_ready(self, timeout: float = 60.0) -> None:
        raise NotImplementedError

    def start(self, timeout: float | None = None) -> Self:
        self.launch()
        self.wait_ready(self.start_timeout if timeout is None else timeout)
        return self

    def stop(self) -> None:
        """Stop the process (idempotent)."""
        if self.process is not None:
            self.process.stop()


def stop_all() -> None:
    """Stop every process started here that is still running, newest first."""
    with _lock:
        procs = list(_live.values())
    for proc in reversed(procs):
        proc.stop(timeout=min(proc.stop_timeout, 5.0))


atexit.register(stop_all)


def stop_on_sigterm() -> None:
    """Make SIGTERM end this process as Ctrl-C does (SystemExit in the main thread), so its
    `finally` blocks and `stop_all` stop the servers it started; by default SIGTERM kills
    it at once and leaves them running. For scripts (benchmarks), not for pytest."""
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
