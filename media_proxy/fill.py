"""Refilling the cache from S3: one GET per file across every process sharing the cache.

Protocol (between processes, on the cache's own filesystem):
- Each store path has a fixed fill file `<cache>/.media-proxy/fill/<hash>`. A process
  becomes the *leader* by creating a private file, taking `flock(LOCK_EX)` on it and
  `link`ing it to that name: the name only ever appears already locked.
- The leader streams S3's body into it, checks length and sha256, fsyncs, and `rename`s it
  onto the final store path while still holding the lock; on failure it unlinks it. The
  kernel drops the lock when the leader exits or dies.
- Any other process that finds the name taken *follows*: it reads the growing file from its
  own descriptor. A `LOCK_SH` probe that succeeds means the leader is gone; the fill
  succeeded iff the final path now holds the very inode being read.
- A name whose lock is free but is not final is a crashed leader's: it is broken (unlinked
  under `LOCK_EX`, after checking the name still points at that inode) and taken over.
Inside one process, one `Fill` per path fans the bytes out to every client; clients send
from the file (sendfile), so a slow client never slows the fill: the file is the buffer.
The last byte is held back from clients until the fill is verified, so no client ever
receives a complete body that did not match the database.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Final

import structlog

from media_proxy import metrics, paths
from media_proxy.s3 import S3, S3Error, S3Unavailable

log = structlog.get_logger(__name__)

HOLDBACK: Final = 1
# Chunks up to this size are written and hashed on the loop: a thread hop costs more.
_INLINE_WRITE_MAX: Final = 64 * 1024
# A fill up to this size is gathered and written whole, in one write before any byte is
# promised, so it needs no reservation (`reserve`'s fallocate cost 70 us here, more than
# the write, before the GET could even be sent).
_WHOLE_MAX: Final = _INLINE_WRITE_MAX
# Larger fills are hashed beside their writes, in a thread reading back what is written,
# this much at a time: the S3 stream never waits for the hash, nor keeps chunks for it.
_HASH_PIECE: Final = 256 * 1024
_HASH_INLINE_MAX: Final = 256 * 1024
# After a write into the cache failed, misses stream uncached this long before trying again.
_DISK_RETRY_S: Final = 30.0
_FOLLOW_POLL_MIN: Final = 0.002
_FOLLOW_POLL_MAX: Final = 0.05
_ACQUIRE_ATTEMPTS: Final = 50
_NO_SPACE_LOG_INTERVAL_S: Final = 60.0
_FALLOC_FL_KEEP_SIZE: Final = 1
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


class FillUnavailable(Exception):
    """The fill could not start (not in S3, S3 error, size mismatch): ask Synapse.

    `unavailable` is set when S3 itself could not answer (down, failing, slow, breaker
    open): Synapse's provider would hang on the same S3, so the caller may answer an error.
    `retry` is set when the process followed had died before sending anything: the caller
    asks again and leads the fill itself.
    """

    def __init__(
        self, message: str, *, unavailable: S3Unavailable | None = None, retry: bool = False
    ) -> None:
        super().__init__(message)
        self.unavailable = unavailable
        self.retry = retry


class CannotCache(FillUnavailable):
    """The cache cannot take the file now (disk full or failing, read-only, no hard links);
    the caller streams it from S3 uncached, with the same verification."""


class NoSpace(CannotCache):
    """The cache's disk is full."""


class Busy(FillUnavailable):
    """Too many fills in flight: in this worker, or (`per_client`) for one client address."""

    def __init__(self, message: str, *, per_client: bool) -> None:
        super().__init__(message)
        self.per_client = per_client


class FillFailed(Exception):
    """The fill broke after bytes were promised: every client of it must be aborted."""


class Fill:
    """One store path being filled, as this process sees it."""

    def __init__(self, rel: str, final_path: str, length: int, fd: int) -> None:
        self.rel, self.final_path, self.length, self.fd = rel, final_path, length, fd
        self.available = 0
        self.readers = 0
        self.ok = False
        self.verified = False  # every byte is in the file and checked: all may be sent
        self.error: BaseException | None = None
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._changed = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.ok or self.error is not None

    def sendable(self) -> int:
        """Bytes a client may be sent now: all but the held-back tail until verified."""
        if self.verified:
            return self.length
        return max(0, min(self.available, self.length - HOLDBACK))

    async def wait_started(self) -> None:
        """Return once S3 has answered with the right object; else FillUnavailable."""
        await asyncio.shield(self._started)

    async def wait_beyond(self, offset: int) -> int:
        """Wait until more than `offset` bytes are sendable; return how many are. Once the
        body is verified it stays sendable, even if caching it fails afterwards."""
        while True:
            if self.verified:
                return self.length
            if self.error is not None:
                raise FillFailed(str(self.error) or type(self.error).__name__)
            n = self.sendable()
            if n > offset:
                return n
            event = self._changed
            await event.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def started(self) -> None:
        if not self._started.done():
            self._started.set_result(None)

    def publish(self, available: int) -> None:
        self.available = available
        self._notify()

    def verify(self) -> None:
        """The whole body is written and matches the database: release the held-back tail
        now; making the file durable (fsync, rename) is the cache's business, not the
        clients' (small misses answer in S3's time, not S3's plus the disk's flush)."""
        self.started()
        self.available = self.length
        self.verified = True
        self._notify()

    def succeed(self) -> None:
        self.started()
        self.available = self.length
        self.verified = True
        self.ok = True
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        if not self._started.done():
            if isinstance(error, FillUnavailable):
                unavailable: FillUnavailable = error
            else:
                cause = error if isinstance(error, S3Unavailable) else None
                unavailable = FillUnavailable(str(error), unavailable=cause)
            self._started.set_exception(unavailable)
            self._started.exception()  # retrieved: nobody may be waiting
        self._notify()

    def release(self) -> None:
        self.readers -= 1
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        if self.readers == 0 and self.finished and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def complete(path: str, length: int) -> bool:
    """A store file counts only with the database's length: Synapse writes in place."""
    try:
        return os.stat(path).st_size == length
    except OSError:
        return False


def reserve(fd: int, length: int) -> None:
    """Reserve a large fill's blocks up front (size unchanged: followers watch the size
    grow), so a full disk shows before a byte is promised rather than in the middle of the
    fill. Small fills need none: they are written whole, at once (`_whole`)."""
    if length and _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, length) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(err, os.strerror(err))


def _write_at(fd: int, data: bytes, offset: int) -> None:
    """pwrite, never write: sendfile on the shared descriptor moves its file position."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _hash_range(fd: int, hasher: Any, start: int, end: int) -> None:
    """Hash bytes [start, end) of the fill file, read back from the page cache, then close
    `fd` (the caller's duplicate: the fill's own descriptor may be closed meanwhile).
    Blocking: run it in a thread (hashlib lets go of the GIL)."""
    try:
        while start < end:
            data = os.pread(fd, min(_HASH_PIECE, end - start), start)
            if not data:
                raise OSError(errno.EIO, "the fill file is shorter than what was written")
            hasher.update(data)
            start += len(data)
    finally:
        os.close(fd)


class _HashBehind:
    """A fill's sha256, kept up with its writes. A small fill's chunks are hashed as they
    come, on the loop (a thread hop would cost more than the hash); a larger fill's written
    bytes are hashed in a thread beside the stream, one range at a time, each range all that
    was written since the last: only the held-back last byte waits for the hash."""

    def __init__(self, fd: int, hasher: Any, length: int) -> None:
        self.fd, self.hasher = fd, hasher
        self.inline = length <= _HASH_INLINE_MAX
        self.hashed = 0
        self.running: asyncio.Future[None] | None = None

    def after(self, chunk: bytes, offset: int) -> None:
        """`chunk` has just been written at `offset`."""
        if self.inline:
            self.hasher.update(chunk)
            self.hashed += len(chunk)
            return
        if self.running is not None:
            if not self.running.done():
                return  # the next range starts once this one is hashed
            self.running.result()  # the thread's error, if any
        end = offset + len(chunk)
        self.running = self._range(end)

    def _range(self, end: int) -> asyncio.Future[None]:
        # A duplicate descriptor, closed by the thread: the fill's own may close before a
        # failed fill's last range is hashed.
        start, self.hashed = self.hashed, end
        running = asyncio.ensure_future(
            asyncio.to_thread(_hash_range, os.dup(self.fd), self.hasher, start, end)
        )
        running.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        return running

    async def finish(self, end: int) -> None:
        """Return once bytes [0, end) are hashed; OSError if they could not be read back."""
        if self.running is not None:
            await self.running
            self.running = None
        if self.hashed < end:
            await self._range(end)


def _rename_into_place(src: str, dst: str) -> None:
    """makedirs + rename, again if an evictor pruned the empty parent in between."""
    for attempt in range(5):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.rename(src, dst)
            return
        except FileNotFoundError:
            if attempt == 4 or not os.path.exists(src):
                raise


def _lock_is_free(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _break_stale(fd: int, path: str) -> bool:
    """Unlink an abandoned fill file, if `path` still names the inode `fd` holds."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        if _same_file(fd, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return True
        return False
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class Filler:
    """The process's view of all fills into one cache directory."""

    def __init__(
        self,
        cache_root: Path,
        s3: S3,
        *,
        chunk_size: int,
        max_fills: int = 64,
        max_fills_per_client: int = 8,
        fill_wait: float = 5.0,
    ) -> None:
        self.cache_root = cache_root
        self.fill_dir = cache_root / paths.FILL_DIR
        self.s3 = s3
        self.chunk_size = chunk_size
        # A fill runs to its end even when its clients hang up: these bound what one worker,
        # and one client address, can set going at once (joining a fill is always free).
        self.max_fills = max_fills
        self.max_fills_per_client = max_fills_per_client
        self._leading: dict[str, str | None] = {}  # rel -> the client address that started it
        # A miss past a cap waits this long for a slot (a burst of thumbnails from one
        # client is queued, not refused); then Busy. Waiters get freed slots in arrival
        # order: a slot is handed over (reserved) as it frees, so a newcomer never takes it
        # from a miss that has waited longer.
        self.fill_wait = fill_wait
        self._queue: collections.deque[tuple[str | None, asyncio.Future[None]]] = (
            collections.deque()
        )
        self._reserved: collections.Counter[str | None] = collections.Counter()
        self._cannot_cache_logged: dict[str, float] = {}
        self._disk_failed_until = 0.0
        umask = os.umask(0)
        os.umask(umask)
        self.file_mode = 0o666 & ~umask  # what Synapse's open(path, "wb") would give
        self._fills: dict[str, Fill] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def prepare(self) -> int:
        """Create the fill directory and remove what crashed fills left; returns the count."""
        self.fill_dir.mkdir(parents=True, exist_ok=True)
        removed = 0
        for entry in os.scandir(self.fill_dir):
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                if _break_stale(fd, entry.path):
                    removed += 1
            finally:
                os.close(fd)
        return removed

    async def open(
        self, rel: str, length: int, sha256: str | None, *, client: str | None = None
    ) -> Fill | None:
        """The fill for `rel` (the caller must `release` it), or None if the file is now
        complete in the store. Raises CannotCache when the cache cannot take it, Busy past
        the caps on fills this worker leads."""
        fill = self._fills.get(rel)
        if fill is not None:
            metrics.fill_joined(same_worker=True)
        else:
            final = paths.in_store(str(self.cache_root), rel)
            if time.monotonic() < self._disk_failed_until and not complete(final, length):
                raise CannotCache("the cache's disk failed a moment ago")
            held = False  # a slot handed to this miss, kept until it leads or gives up
            if self._over_caps(client) and not complete(final, length):
                await self._wait_for_slot(client)
                held = True
            try:
                fill = self._fills.get(rel)  # someone may have started it meanwhile
                if fill is not None:
                    fill.readers += 1
                    return fill
                try:
                    role, fd = self._acquire(rel, final, length)
                except OSError as e:
                    raise self._cannot_cache(rel, length, e) from e
                if role == "hit":
                    return None
                if role == "lead":
                    if not held:
                        self._check_caps(rel, fd, client)
                    try:
                        if length > _WHOLE_MAX:
                            reserve(fd, length)
                    except OSError as e:
                        self._abandon(rel, fd)
                        raise self._cannot_cache(rel, length, e) from e
                    if held:
                        held = False
                        self._reserved[client] -= 1  # the slot is counted in _leading now
                    self._leading[rel] = client
            finally:
                if held:  # not leading after all: the slot goes to the next in line
                    self._unreserve(client)
            if role == "lead":
                metrics.fill_started(self.in_flight)
            else:
                metrics.fill_joined(same_worker=False)
            fill = Fill(rel, final, length, fd)
            self._fills[rel] = fill
            driver = self._lead(fill, sha256) if role == "lead" else self._follow(fill)
            task = asyncio.create_task(driver)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        fill.readers += 1
        return fill

    def _taken(self) -> int:
        """Slots in use: fills led, and slots handed to waiters not yet leading."""
        return len(self._leading) + sum(self._reserved.values())

    def _taken_by(self, client: str) -> int:
        return sum(1 for c in self._leading.values() if c == client) + self._reserved[client]

    def _over_caps(self, client: str | None) -> bool:
        if self._taken() >= self.max_fills:
            return True
        return client is not None and self._taken_by(client) >= self.max_fills_per_client

    async def _wait_for_slot(self, client: str | None) -> None:
        """Wait in line up to `fill_wait` for a slot, and return holding it (reserved for
        this miss: `_reserved`); else Busy."""
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (client, granted)
        self._queue.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), self.fill_wait)
        except BaseException as e:  # timed out, or the request was cancelled
            with contextlib.suppress(ValueError):
                self._queue.remove(entry)
            if granted.done() and not granted.cancelled():  # handed over as the wait ended
                if isinstance(e, TimeoutError):
                    return
                self._unreserve(client)
                raise
            granted.cancel()
            if isinstance(e, TimeoutError):
                per_client = self._taken() < self.max_fills
                raise Busy("no fill slot came free in time", per_client=per_client) from None
            raise

    def _hand_over(self) -> None:
        """Give free slots to waiters, first come first served (skipping those whose own
        client is still at its cap)."""
        for entry in list(self._queue):
            client, granted = entry
            if self._taken() >= self.max_fills:
                return
            if granted.done():
                continue
            if client is not None and self._taken_by(client) >= self.max_fills_per_client:
                continue
            self._queue.remove(entry)
            self._reserved[client] += 1
            granted.set_result(None)

    def _unreserve(self, client: str | None) -> None:
        self._reserved[client] -= 1
        self._hand_over()

    def _free_slot(self, rel: str) -> None:
        self._leading.pop(rel, None)
        self._hand_over()

    def _check_caps(self, rel: str, fd: int, client: str | None) -> None:
        if self._taken() >= self.max_fills:
            self._abandon(rel, fd)
            raise Busy(f"{len(self._leading)} fills in flight in this worker", per_client=False)
        if client is not None:
            mine = self._taken_by(client)
            if mine >= self.max_fills_per_client:
                self._abandon(rel, fd)
                raise Busy(f"{mine} fills in flight for {client}", per_client=True)

    @property
    def in_flight(self) -> int:
        """Fills this worker leads now."""
        return len(self._leading)

    def _abandon(self, rel: str, fd: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.fill_dir / paths.fill_name(rel))
        os.close(fd)  # drops the lock

    def _disk_failed(self, fill: Fill, error: OSError, *, promised: bool) -> Exception:
        """A write into the cache failed. For the next `_DISK_RETRY_S` misses stream from S3
        uncached rather than fail the same way; this fill's clients, if already promised
        bytes, are aborted (FillFailed), else they are streamed uncached too (CannotCache)."""
        self._disk_failed_until = time.monotonic() + _DISK_RETRY_S
        cannot = self._cannot_cache(fill.rel, fill.length, error)
        return FillFailed(f"writing the fill failed: {error}") if promised else cannot

    def _cannot_cache(self, rel: str, length: int, error: OSError) -> CannotCache:
        """The disk said no: log it once per interval and kind, and stream uncached."""
        kind = "no_space" if _is_no_space(error) else errno.errorcode.get(error.errno or 0, "?")
        now = time.monotonic()
        if now - self._cannot_cache_logged.get(kind, -_NO_SPACE_LOG_INTERVAL_S) >= (
            _NO_SPACE_LOG_INTERVAL_S
        ):
            self._cannot_cache_logged[kind] = now
            event = "cache_fill.no_space" if kind == "no_space" else "cache_fill.cannot_cache"
            log.warning(
                event, rel=rel, bytes=length, error=str(error), detail="serving from S3 uncached"
            )
        return (NoSpace if kind == "no_space" else CannotCache)(str(error))

    def _acquire(self, rel: str, final: str, length: int) -> tuple[str, int]:
        name = str(self.fill_dir / paths.fill_name(rel))
        for _ in range(_ACQUIRE_ATTEMPTS):
            if complete(final, length):
                return "hit", -1
            private = f"{name}.{os.getpid()}.{secrets.token_hex(4)}"
            try:
                fd = os.open(private, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:  # someone removed .media-proxy/ under us
                self.fill_dir.mkdir(parents=True, exist_ok=True)
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fresh inode: never contended
            try:
                os.link(private, name)
            except FileExistsError:
                os.close(fd)
                os.unlink(private)
            except OSError:  # no hard links here (EPERM, EOPNOTSUPP, EMLINK): cannot cache
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(private)
                raise
            else:
                os.unlink(private)
                if complete(final, length):  # a fill finished since our first look
                    os.unlink(name)
                    os.close(fd)
                    return "hit", -1
                return "lead", fd
            try:
                rfd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # that fill just ended: look again
            if not _lock_is_free(rfd):
                return "follow", rfd
            if _same_file(rfd, final) and os.fstat(rfd).st_size == length:
                os.close(rfd)
                return "hit", -1
            _break_stale(rfd, name)
            os.close(rfd)
        raise FillUnavailable(f"could not lead or follow the fill of {rel}")

    async def _lead(self, fill: Fill, sha256: str | None) -> None:
        name = str(self.fill_dir / paths.fill_name(fill.rel))
        obj = None
        try:
            try:
                obj = await self.s3.open(fill.rel)
            except S3Unavailable as e:
                raise FillUnavailable(str(e), unavailable=e) from e
            except S3Error as e:
                raise FillUnavailable(str(e)) from e
            if obj is None:
                raise FillUnavailable("not in S3")
            if obj.length != fill.length:
                raise FillUnavailable(f"S3 holds {obj.length} bytes, the database {fill.length}")
            hasher = hashlib.sha256() if sha256 else None
            hashing = _HashBehind(fill.fd, hasher, fill.length)
            written = 0
            chunks = obj.chunks(self.chunk_size)
            if fill.length <= _WHOLE_MAX:
                chunks = _whole(chunks, fill.length)
            async for chunk in chunks:
                if written + len(chunk) > fill.length:
                    raise FillFailed("S3 sent more bytes than it announced")
                try:
                    if len(chunk) <= _INLINE_WRITE_MAX:
                        _write_at(fill.fd, chunk, written)
                    else:  # writing a large chunk would stall other requests
                        await asyncio.to_thread(_write_at, fill.fd, chunk, written)
                    if hasher is not None:
                        hashing.after(chunk, written)  # a failed read-back is the disk's too
                except OSError as e:
                    raise self._disk_failed(fill, e, promised=written > 0) from e
                written += len(chunk)
                fill.publish(written)
                fill.started()  # clients get headers once the disk took the first bytes
            fill.started()  # an empty file
            if written != fill.length:
                raise FillFailed(f"S3 body ended after {written} of {fill.length} bytes")
            if hasher is not None and sha256 is not None:
                try:
                    await hashing.finish(written)
                except OSError as e:
                    raise self._disk_failed(fill, e, promised=True) from e
                if hasher.hexdigest() != sha256.lower():
                    raise FillFailed("sha256 of the S3 object differs from the database's")
            fill.verify()
            self._free_slot(fill.rel)  # the caps count S3 streams, not fsyncs
            try:
                await asyncio.to_thread(os.fsync, fill.fd)
                if os.fstat(fill.fd).st_size != fill.length:
                    raise FillFailed("the fill file's size differs from what was written")
                os.fchmod(fill.fd, self.file_mode)
                _rename_into_place(name, fill.final_path)
            except OSError as e:
                raise self._disk_failed(fill, e, promised=True) from e
            fill.succeed()
            log.info("cache_fill.done", rel=fill.rel, bytes=written)
        except BaseException as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            fill.fail(e)
            level = "info" if isinstance(e, FillUnavailable) else "warning"
            event = "cache_fill.no_space" if _is_no_space(e) else "cache_fill.failed"
            getattr(log, level)(event, rel=fill.rel, error=str(e) or type(e).__name__)
            if not isinstance(e, Exception):
                raise
        finally:
            if obj is not None:
                obj.close()
            fcntl.flock(fill.fd, fcntl.LOCK_UN)
            self._fills.pop(fill.rel, None)
            if fill.rel in self._leading:
                self._free_slot(fill.rel)
            metrics.fills_in_flight(self.in_flight)
            fill._close_if_unused()

    async def _follow(self, fill: Fill) -> None:
        """Read another process's fill as it grows. Clients are promised bytes only once
        the leader shows it is alive (the file grew while we watched, or it completed): a
        dead leader's file, or one being broken by a third process, never starts a 200."""
        delay = _FOLLOW_POLL_MIN
        first_size = os.fstat(fill.fd).st_size
        try:
            while True:
                size = os.fstat(fill.fd).st_size
                if size > fill.available and size > first_size:
                    fill.started()
                    fill.publish(min(size, fill.length))
                    delay = _FOLLOW_POLL_MIN
                if _lock_is_free(fill.fd):
                    size = os.fstat(fill.fd).st_size  # the leader may have written more
                    if _same_file(fill.fd, fill.final_path) and size == fill.length:
                        fill.succeed()
                    else:
                        fill.fail(
                            FillFailed("the process leading this fill gave up")
                            if fill.available
                            else FillUnavailable("the leader is gone", retry=True)
                        )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, _FOLLOW_POLL_MAX)
        except BaseException as e:
            fill.fail(e)
            if not isinstance(e, Exception):
                raise
        finally:
            self._fills.pop(fill.rel, None)
            fill._close_if_unused()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _whole(chunks: AsyncIterator[bytes], length: int) -> AsyncIterator[bytes]:
    """A small body as one chunk: written at once, it either fails before any byte is
    promised (and is streamed uncached) or lands whole. More than `length` bytes end the
    gathering: the caller refuses a body longer than announced."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        parts.append(chunk)
        size += len(chunk)
        if size > length:
            break
    if parts:
        yield b"".join(parts)


def _is_no_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
