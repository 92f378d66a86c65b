"""Step 3: find the bytes: the local store first, then S3 (through a coalesced fill).

A store file counts only when its size is the database's length (Synapse writes in place,
so a crash leaves short files); anything else is a miss. `None` means neither the store
nor S3 can serve it exactly, and the request goes to Synapse.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from media_proxy import paths
from media_proxy.fill import Fill, Filler, FillUnavailable, NoSpace
from media_proxy.s3 import S3Error, S3Object


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
    def __init__(self, cache_root: Path, filler: Filler | None) -> None:
        self.cache_root = str(cache_root)
        self.filler = filler

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

    async def locate(
        self, rel: str, length: int, sha256: str | None, *, open_hit: bool = True
    ) -> Found | None:
        hit = self._hit(rel, length, open_hit)
        if hit is not None:
            return hit
        if self.filler is None:
            return None
        try:
            fill = await self.filler.open(rel, length, sha256)
        except NoSpace:
            return await self._direct(rel, length)
        except (FillUnavailable, OSError):
            return None
        if fill is None:  # completed by another process meanwhile
            return self._hit(rel, length, open_hit)
        try:
            await fill.wait_started()
        except FillUnavailable:
            fill.release()
            return None
        return Miss(rel, fill)

    async def _direct(self, rel: str, length: int) -> Direct | None:
        assert self.filler is not None
        try:
            body = await self.filler.s3.open(rel)
        except S3Error:
            return None
        if body is None:
            return None
        if body.length != length:
            body.close()
            return None
        return Direct(rel, body)
