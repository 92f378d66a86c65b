"""Single byte ranges on downloads (RFC 9110 section 14), which Synapse has never had.

Video players seek with `Range: bytes=a-` and Safari refuses to play a video whose server
answers a range request with 200. The decision is a pure function of the request's headers
and the file's length; anything unusual (several ranges, a malformed header, an If-Range
that does not match) gets the whole file with 200, which RFC 9110 always allows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from media_proxy.headers import IMMUTABLE_ETAG

_SPEC: Final = re.compile(r"\A(\d*)-(\d*)\Z")


@dataclass(frozen=True, slots=True)
class ByteRange:
    """Bytes `start` to `end` inclusive of a file of `length` bytes."""

    start: int
    end: int
    length: int

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.length}"


@dataclass(frozen=True, slots=True)
class Unsatisfiable:
    """No byte of the file is in the range asked: 416 with `Content-Range: bytes */length`."""

    length: int

    def content_range(self) -> str:
        return f"bytes */{self.length}"


def choose(
    range_headers: Sequence[str], if_range: Sequence[str], length: int
) -> ByteRange | Unsatisfiable | None:
    """The range to answer, Unsatisfiable, or None for the whole file with 200."""
    if len(range_headers) != 1 or len(if_range) > 1:
        return None
    if if_range and if_range[0].strip() != IMMUTABLE_ETAG:
        return None  # a validator we did not send (or a date: we send no Last-Modified)
    unit, eq, specs = range_headers[0].partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in specs.split(",")]
    if len(parts) != 1:
        return None  # several ranges: the whole file (multipart/byteranges is not offered)
    match = _SPEC.match(parts[0])
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        suffix = int(last)
        if suffix == 0 or length == 0:
            return Unsatisfiable(length)
        return ByteRange(max(0, length - suffix), length - 1, length)
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored, as RFC 9110 says
    if start >= length:
        return Unsatisfiable(length)
    end = min(int(last), length - 1) if last else length - 1
    return ByteRange(start, end, length)
