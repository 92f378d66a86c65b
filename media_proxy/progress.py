"""Progress and summaries of long cache commands.

On a terminal (stderr is a TTY) one status line is redrawn in place; otherwise a structured
`<what>.progress` log line is written every few seconds. Every command ends with a `Summary`:
files and bytes acted on, seconds, and what was skipped and why.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final, TextIO

import structlog

log = structlog.get_logger("media_proxy.cache")

_REDRAW_S: Final = 0.2
_LOG_EVERY_S: Final = 10.0


def human(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@dataclass
class Summary:
    """What a command did: `files`/`bytes` acted on, `skipped` per reason."""

    action: str  # "evicted", "uploaded", "would evict", ...
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_bytes: Counter[str] = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)

    def done(self, size: int) -> None:
        self.files += 1
        self.bytes += size

    def skip(self, reason: str, size: int) -> None:
        self.skipped[reason] += 1
        self.skipped_bytes[reason] += size

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "files": self.files,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "skipped": {
                r: {"files": n, "bytes": self.skipped_bytes[r]}
                for r, n in sorted(self.skipped.items())
            },
            **self.extra,
        }

    def lines(self) -> list[str]:
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"{self.action}: {self.files} files, {human(self.bytes)} in {self.seconds:.1f} s"
            f" ({self.files / self.seconds if self.seconds > 0 else 0:.0f} files/s,"
            f" {human(rate)}/s)"
        ]
        for reason, n in sorted(self.skipped.items()):
            out.append(f"  skipped {reason}: {n} files, {human(self.skipped_bytes[reason])}")
        for key, value in self.extra.items():
            if isinstance(value, int) and "bytes" in key:
                value = f"{value} ({human(value)})"
            out.append(f"  {key}: {value}")
        return out


class Progress:
    """Counts files and bytes done out of a known total, and shows it."""

    def __init__(
        self, what: str, total_files: int, total_bytes: int, *, stream: TextIO | None = None
    ) -> None:
        self.what = what
        self.total_files, self.total_bytes = total_files, total_bytes
        self.files = self.bytes = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._shown = 0.0
        self._logged = self.started

    def advance(self, files: int = 1, size: int = 0) -> None:
        self.files += files
        self.bytes += size
        now = time.monotonic()
        if self.tty and now - self._shown >= _REDRAW_S:
            self._shown = now
            self.stream.write("\r\x1b[K" + self._line(now))
            self.stream.flush()
        elif not self.tty and now - self._logged >= _LOG_EVERY_S:
            self._logged = now
            log.info(
                f"{self.what}.progress",
                files=self.files,
                total_files=self.total_files,
                bytes=self.bytes,
                total_bytes=self.total_bytes,
                seconds=round(now - self.started, 1),
            )

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        pct = 100 * self.files / self.total_files if self.total_files else 100.0
        return (
            f"{self.what}: {self.files}/{self.total_files} files ({pct:.0f}%),"
            f" {human(self.bytes)}, {self.files / elapsed:.0f} files/s"
        )

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
