"""structlog set-up: JSON lines in production, readable console output on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog


def configure(fmt: str = "auto", level: str = "info") -> None:
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
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
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
        ),
        # One write per event (print() writes the line and its newline separately, so the
        # events of several workers sharing stderr could interleave on one line).
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (aiohttp, asyncio, botocore): render their
    # records with the same renderer, so every line the proxy prints is one event.
    handler = logging.StreamHandler(sys.stderr)
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
