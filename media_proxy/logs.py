"""structlog set-up: JSON lines in production, readable console output on a terminal."""

from __future__ import annotations

import asyncio
import atexit
import datetime
import json
import logging
import os
import sys
import threading
from typing import Any, Final

import structlog

# Lines of one loop iteration are written together in pieces of at most this size: a write
# of up to PIPE_BUF bytes to a pipe is never split by another worker's (and a shared file's
# writes are serialized by the kernel), so no event is ever cut by another.
_PIECE: Final = 4096


# Where `info` writes directly (JSON output), else None: structlog's chain, or nothing.
_direct: Lines | None = None
_info_enabled = True
_log = structlog.get_logger("media_proxy")


def configure(fmt: str = "auto", level: str = "info") -> None:
    global _direct, _info_enabled
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    _info_enabled = threshold <= logging.INFO
    _direct = None if console else _lines_for(sys.stderr)
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # Whole lines only, gathered per loop iteration (see `Lines`).
        logger_factory=structlog.WriteLoggerFactory(sys.stderr)
        if console
        else _LinesLoggerFactory(_lines_for(sys.stderr)),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (aiohttp, asyncio, botocore): render their
    # records with the same renderer, so every line the proxy prints is one event.
    handler: logging.Handler = (
        logging.StreamHandler(sys.stderr) if console else _LinesHandler(_lines_for(sys.stderr))
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                _library_warning_without_traceback,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    # aiohttp's own access log would be a second line per request: ours carries more.
    logging.getLogger("aiohttp.access").disabled = True


_dumps = json.JSONEncoder(default=repr).encode


def info(event: str, fields: dict[str, Any]) -> None:
    """`log.info(event, **fields)`, the same JSON line, without structlog's machinery.

    For the event every request logs: structlog's bound logger and processors, with one write
    per event (`Lines` gathers them), cost a serving worker about 10 us of its ~130 us per
    cache hit (medians of ten alternating runs). Console output (a terminal) goes through
    structlog as any event. `fields` is taken over.
    """
    if not _info_enabled:
        return
    if _direct is None:
        _log.info(event, **fields)
        return
    fields["event"] = event
    structlog.contextvars.merge_contextvars(None, "info", fields)
    fields["level"] = "info"
    now = datetime.datetime.now(tz=datetime.UTC).isoformat()
    fields["timestamp"] = now.replace("+00:00", "Z")
    _direct.add(_dumps(fields))


def _library_warning_without_traceback(
    _logger: object, _method: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """A library's warning about an expected condition (asyncpg retrying a database that is
    down, say) becomes one line with the error; its traceback is kept for errors only."""
    record = event.get("_record")
    exc_info = event.get("exc_info")
    if record is not None and record.levelno < logging.ERROR and exc_info:
        error = exc_info[1] if isinstance(exc_info, tuple) else None
        event.pop("exc_info")
        if error is not None:
            event["error"] = f"{type(error).__name__}: {error}"
    return event


class Lines:
    """Whole log lines to a file descriptor, gathered while an event loop runs and written
    once per loop iteration (`call_soon`), in pieces of whole lines.

    One write per event is an append to the log file (its size and times change with each
    write), on every request; a loop iteration that answers several requests now writes
    their lines at once (see `info` for what both saved). Lines from
    outside the loop's thread, or with no loop running, are written at once, after
    whatever was gathered, so the order of a process's lines is the order of its events.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lines: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on
        self._thread = 0  # the thread that loop ran in when the flush was set
        self._lock = threading.Lock()

    def add(self, text: str) -> None:
        """One rendered event, without its newline."""
        line = text.encode("utf-8", "backslashreplace") + b"\n"
        due = self._loop
        if due is not None and self._thread == threading.get_ident() and due.is_running():
            # Its flush is due in this iteration: `get_running_loop` is not asked, since on
            # Python 3.11 every call makes a getpid() system call (3% of a hit's CPU here).
            with self._lock:
                if self._loop is due:
                    self._lines.append(line)
                    return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._lines.append(line)
            if loop is None or (self._loop is not None and self._loop is not loop):
                self._flush_locked()
            elif self._loop is None:
                self._loop, self._thread = loop, threading.get_ident()
                loop.call_soon(self.flush)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._loop = None
        lines, self._lines = self._lines, []
        for piece in pieces(lines):
            self._write(piece)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # stderr closed or full: a log line must never take the process down
            view = view[n:]


def pieces(lines: list[bytes], limit: int = _PIECE) -> list[bytes]:
    """`lines` joined into as few writes as possible, each whole lines of at most `limit`
    bytes together (a longer line is a write of its own)."""
    out: list[bytes] = []
    piece: list[bytes] = []
    size = 0
    for line in lines:
        if piece and size + len(line) > limit:
            out.append(b"".join(piece))
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        out.append(b"".join(piece))
    return out


_by_fd: dict[int, Lines] = {}


def _lines_for(stream: Any) -> Lines:
    fd = stream.fileno()
    if fd not in _by_fd:
        _by_fd[fd] = Lines(fd)
    return _by_fd[fd]


def flush() -> None:
    """Write every gathered line now (before `os._exit`, a fork, or the loop's end)."""
    for lines in _by_fd.values():
        lines.flush()


def _after_fork_in_child() -> None:
    for lines in _by_fd.values():
        lines._lock = threading.Lock()  # another thread of the parent may have held it
        lines._lines, lines._loop = [], None


atexit.register(flush)
# Gathered lines are written before a fork, never by both processes after it.
os.register_at_fork(before=flush, after_in_child=_after_fork_in_child)


class _LinesLogger:
    """structlog's logger over `Lines`: `msg` takes one rendered event."""

    def __init__(self, lines: Lines) -> None:
        self._lines = lines

    def msg(self, message: str) -> None:
        self._lines.add(message)

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


class _LinesLoggerFactory:
    def __init__(self, lines: Lines) -> None:
        self._lines = lines

    def __call__(self, *args: Any) -> _LinesLogger:
        return _LinesLogger(self._lines)


class _LinesHandler(logging.Handler):
    """The standard library's records (aiohttp, asyncio, botocore) into the same `Lines`,
    so they keep their place among the proxy's own events."""

    def __init__(self, lines: Lines) -> None:
        super().__init__()
        self._lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.add(line)
