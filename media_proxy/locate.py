"""Step 3: find the bytes: the local store first, then S3 (through a coalesced fill).

A store file counts only when its size is the database's length (Synapse writes in place,
so a crash leaves short files); anything else is a miss. `None` means neither the store
nor S3 can serve it exactly, and the request goes to Synapse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from media_proxy import paths
from media_proxy.fill import Busy, CannotCache, Fill, Filler, FillUnavailable
from media_proxy.respond import Refused
from media_proxy.s3 import S3Error, S3Object, S3Unavailable


@dataclass(slots=True)
class Hit:
    """An open, complete store file; the caller closes `fd` (or -1 in X-Accel mode)."""

    rel: str
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


@dataclass(slots=True)
class Miss:
    """A fill in progress (or just started); the caller releases it."""

    rel: str
    fill: Fill

    def close(self) -> None:
        self.fill.release()


@dataclass(slots=True)
class Direct:
    """An S3 body streamed to one client without caching (the cache has no room)."""

    rel: str
    body: S3Object

    def close(self) -> None:
        self.body.close()


Found = Hit | Miss | Direct


class Locator:
    """`s3_unavailable` says what a miss gets while S3 cannot answer: "error" (502, or 504
    for a timeout, at once; Synapse's provider would hang on the same S3) or "synapse"
    (pass the request on anyway)."""

    def __init__(
        self, cache_root: Path, filler: Filler | None, *, s3_unavailable: str = "error"
    ) -> None:
        self.cache_root = str(cache_root)
        self.filler = filler
        self.s3_unavailable = s3_unavailable

    def _hit(self, rel: str, length: int, open_hit: bool = True) -> Hit | None:
        path = paths.in_store(self.cache_root, rel)
        if not open_hit:  # X-Accel mode: nginx opens the file
            try:
                return Hit(rel, -1) if os.stat(path).st_size == length else None
            except OSError:
                return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        if os.fstat(fd).st_size != length:
            os.close(fd)
            return None
        return Hit(rel, fd)

    def stored(self, rel: str, length: int) -> Hit | None:
        """The store file if it is complete, unopened (nginx sends it): a decision only."""
        return self._hit(rel, length, open_hit=False)

    async def locate(
        self,
        rel: str,
        length: int,
        sha256: str | None,
        *,
        open_hit: bool = True,
        client: str | None = None,
    ) -> Found | None:
        """The store file, else a fill from S3, else None (Synapse answers). Raises
        respond.Refused when the answer is an error the proxy gives itself (S3 down, too
        many fills)."""
        hit = self._hit(rel, length, open_hit)
        if hit is not None:
            return hit
        if self.filler is None:
            return None
        for _ in range(_FOLLOW_RETRIES):
            try:
                fill = await self.filler.open(rel, length, sha256, client=client)
            except CannotCache:
                return await self._direct(rel, length, sha256)
            except Busy as e:
                raise _busy(e) from e
            except FillUnavailable as e:
                self._raise_if_down(e)
                return None
            if fill is None:  # completed by another process meanwhile
                return self._hit(rel, length, open_hit)
            try:
                await fill.wait_started()
            except FillUnavailable as e:
                fill.release()
                if e.retry:  # the process we followed had died: lead it ourselves
                    continue
                if isinstance(e, CannotCache):  # the disk refused the first bytes
                    return await self._direct(rel, length, sha256)
                self._raise_if_down(e)
                return None
            return Miss(rel, fill)
        return None

    def _raise_if_down(self, error: FillUnavailable | S3Unavailable) -> None:
        """Refused when S3 itself is down and the admin wants an error (the default), else
        nothing: the caller passes the request to Synapse."""
        down = error if isinstance(error, S3Unavailable) else error.unavailable
        if down is None or self.s3_unavailable == "synapse":
            return None
        if down.timeout:
            raise Refused(504, "M_UNKNOWN", "The media store did not answer in time")
        raise Refused(502, "M_UNKNOWN", "The media store is unavailable: try again later")

    async def _direct(self, rel: str, length: int, sha256: str | None) -> Direct | None:
        assert self.filler is not None
        try:
            body = await self.filler.s3.open(rel)
        except S3Unavailable as e:
            self._raise_if_down(e)
            return None
        except S3Error:
            return None
        if body is None:
            return None
        if body.length != length:
            body.close()
            return None
        body.sha256 = sha256
        return Direct(rel, body)


# A follower whose leader died before sending anything leads instead; twice is plenty.
_FOLLOW_RETRIES: Final = 3


def _busy(error: Busy) -> Refused:
    if error.per_client:
        return Refused(429, "M_LIMIT_EXCEEDED", "Too Many Requests", retry_after_ms=1000)
    return Refused(503, "M_UNKNOWN", "Too many files are being fetched: try again shortly")
