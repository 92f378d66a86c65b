"""Which stored thumbnail Synapse would send for a request, as a pure function.

With `dynamic_thumbnails` off, Synapse picks among the stored rows by a ranking of its own
(`ThumbnailProvider._select_thumbnail`); with it on, it serves only an exact match and
generates anything else. `choose` returns the row Synapse would serve, or None whenever the
answer could differ from Synapse's (no rows, no candidate, a tie that only the database's row
order would break, a missing length, anything Synapse would generate): the request then goes
to Synapse, which also regenerates thumbnails whose files are gone everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

from media_proxy.parse import ThumbnailParams


class Row(Protocol):
    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def method(self) -> str: ...
    @property
    def content_type(self) -> str: ...
    @property
    def length(self) -> int | None: ...


def _crop_key(w: int, h: int, t: Row, desired_type: str) -> tuple[int | bool, ...]:
    return (
        abs(w * t.height - h * t.width),  # aspect ratio closest
        0 if w <= t.width and h <= t.height else 1,  # at least as big as asked
        abs((w - t.width) * (h - t.height)),  # size closest
        desired_type != t.content_type,  # the asked type wins ties only
        t.length or 0,  # then the smaller file
    )


def _scale_key(w: int, h: int, t: Row, desired_type: str) -> tuple[int | bool, ...]:
    return (abs((w - t.width) * (h - t.height)), desired_type != t.content_type, t.length or 0)


R = TypeVar("R", bound=Row)


def choose(rows: Sequence[R], want: ThumbnailParams, *, dynamic: bool) -> R | None:
    """The row Synapse would serve, or None to let Synapse answer."""
    if any(r.length is None for r in rows):
        return None
    if dynamic:
        exact = [
            r
            for r in rows
            if (r.width, r.height, r.method, r.content_type)
            == (want.width, want.height, want.method, want.desired_type)
        ]
        return exact[0] if exact else None
    method = want.method.lower()
    if method not in ("crop", "scale"):
        return None
    key = _crop_key if method == "crop" else _scale_key
    w, h = want.width, want.height
    candidates = [r for r in rows if r.method == method]
    # Rows reaching the asked size in one dimension are preferred; smaller ones only if none.
    big = [r for r in candidates if r.width >= w or r.height >= h]
    pool = big or candidates
    if not pool:
        return None
    ranked = sorted(pool, key=lambda r: key(w, h, r, want.desired_type))
    best = key(w, h, ranked[0], want.desired_type)
    if len(ranked) > 1 and key(w, h, ranked[1], want.desired_type) == best:
        return None  # Synapse keeps the first in database order: not ours to guess
    return ranked[0]
