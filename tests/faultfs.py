"""A fault-injecting filesystem to put between the code under test and a real directory.

The disk-side twin of tests/faults.py: a passthrough FUSE mount (mfusepy over libfuse3) of a
backing directory, served by its own process so that a FUSE operation that blocks or crashes
never deadlocks the test process. Faults are switched at run time from the test process:

    fs = FaultFS(backing=tmp / "store", mountpoint=tmp / "mnt").start()   # returns once mounted
    fs.fail_reads(match="local_content/", after=4096)           # bytes before 4096, then EIO
    fs.fail_writes(match=".media-proxy/fill/", errno=ENOSPC)    # writes at offset >= after
    fs.fail_op("fsync", match="fill/", errno=EIO)               # any other named operation
    fs.read_only(True)                                          # every mutating op -> EROFS
    fs.hits()          # {"read": 2, ...}: faults injected so far, to prove a test hit one
    fs.clear(); fs.stop()   # stop unmounts and waits for (or kills) the FUSE process by PID

Each call is acknowledged by the FUSE process before it returns, so it applies to every
operation that reaches the filesystem afterwards. ``match`` is a substring of the path
relative to the mount root (no leading slash); "" matches every path. Faults on an open file
match the path it was opened by.

Page cache (measured on Linux 6.18): files go through the page cache as on a real disk (no
direct_io; under direct_io sendfile(2) still reads through the page cache and takes the short
read at ``after`` for end of file). Every open drops the file's cached pages (no keep_cache),
so a descriptor opened after ``fail_reads`` reads through FUSE. A read request crossing
``after`` fails whole and the kernel retries page by page, so read(2) and sendfile(2) both
return the bytes before ``after`` rounded down to a page (4096: use a multiple of it for an
exact split), then the errno. A descriptor opened before ``fail_reads`` may still be served
pages it already cached.

Close to a local filesystem on purpose: attribute and entry caches are off (a growing file's
size is seen at once through any name), unlinked-but-open files stay readable (hard_remove,
no .fuse_hidden files in the backing directory), flock on files is taken on the backing file
(so a lock taken through one hard-linked name is seen through another, as the fill protocol
needs; a blocking flock holds one FUSE worker thread while it waits), fallocate passes any mode
through (KEEP_SIZE included; write faults apply to it). Writes are write-through: a write
fault is seen by write(2) itself, not later at close.
Limits: flock on a directory is kept by the kernel, per mount (fine between processes using
the mount); rename flags (RENAME_NOREPLACE/EXCHANGE) are refused with EINVAL; faults cannot be
injected into what the kernel answers alone (page-cache hits, directory flock, permission
checks).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as errnos
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

#: Operations ``fail_op`` accepts (read and write have their own offset-aware calls).
OPS = frozenset(
    {
        "getattr", "open", "create", "mkdir", "unlink", "rmdir", "rename", "link", "symlink",
        "truncate", "chmod", "chown", "utimens", "fsync", "flush", "fallocate",
        "statfs", "readdir", "readlink", "mknod",
    }
)  # fmt: skip
#: Operations that change the filesystem: all answer EROFS while read_only is on.
MUTATING = frozenset(
    {
        "create", "mkdir", "unlink", "rmdir", "rename", "link", "symlink", "truncate", "chmod",
        "chown", "utimens", "fallocate", "mknod", "write",
    }
)  # fmt: skip
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class FaultFS:
    """The test side: starts the FUSE process, sends it faults, unmounts it."""

    def __init__(self, backing: Path, mountpoint: Path) -> None:
        self.backing = Path(backing).resolve()
        self.mountpoint = Path(mountpoint).resolve()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._reader: Any = None
        self._lock = threading.Lock()
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as self)

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    def start(self) -> Self:
        """Spawn the FUSE process and return once the mount answers."""
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                str(self.backing),
                str(self.mountpoint),
                str(theirs.fileno()),
            ],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
        )
        theirs.close()
        ours.settimeout(START_TIMEOUT)
        self._sock = ours
        self._reader = ours.makefile("rb")
        try:
            ready = self._reader.readline()
        except TimeoutError:
            ready = b""
        if ready != b"ready\n":
            self._kill()
            raise RuntimeError(f"faultfs did not mount {self.mountpoint}: {self._log()}")
        ours.settimeout(None)
        return self

    def fail_reads(self, match: str = "", after: int = 0, errno: int = errnos.EIO) -> None:
        """Reads of matching files at offsets >= ``after`` fail with ``errno``."""
        self._send({"cmd": "rule", "op": "read", "match": match, "after": after, "errno": errno})

    def fail_writes(self, match: str = "", after: int = 0, errno: int = errnos.EIO) -> None:
        """Writes (and fallocate) to matching files at offsets >= ``after`` fail with ``errno``."""
        self._send({"cmd": "rule", "op": "write", "match": match, "after": after, "errno": errno})

    def fail_op(self, op: str, match: str = "", errno: int = errnos.EIO) -> None:
        """Every ``op`` (one of OPS) on a matching path (either path of rename/link) fails."""
        if op not in OPS:
            raise ValueError(f"fail_op: unknown op {op!r}; one of {sorted(OPS)}")
        self._send({"cmd": "rule", "op": op, "match": match, "after": 0, "errno": errno})

    def read_only(self, on: bool = True) -> None:
        """Every mutating op (and open for writing) fails with EROFS while on."""
        self._send({"cmd": "read_only", "on": on})

    def clear(self) -> None:
        """Remove every fault (read_only included); hits are kept."""
        self._send({"cmd": "clear"})

    def hits(self) -> dict[str, int]:
        """Faults injected so far, by op ("read", "write", "fsync", ...; "read_only")."""
        hits: dict[str, int] = self._send({"cmd": "hits"})["hits"]
        return hits

    def stop(self) -> None:
        """Unmount, wait for the FUSE process to exit, kill it by PID if it lingers.

        A mount still in use (a descriptor open on it) is detached lazily and its process told
        to exit: descriptors left open then fail with ENOTCONN, as on a vanished disk.
        """
        if self._proc is None:
            return
        if self._proc.poll() is None and _unmount(self.mountpoint) != 0:
            _unmount(self.mountpoint, lazy=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, signal.SIGTERM)
        try:
            self._proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
        if is_mounted(self.mountpoint):  # the process died without unmounting
            _unmount(self.mountpoint, lazy=True)
        self._close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _send(self, msg: dict[str, Any]) -> dict[str, Any]:
        assert self._sock is not None and self._reader is not None, "not started"
        with self._lock:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
            line = self._reader.readline()
        if not line:
            raise RuntimeError(f"faultfs process is gone: {self._log()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _kill(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, signal.SIGKILL)
        self._proc.wait()
        if is_mounted(self.mountpoint):
            _unmount(self.mountpoint, lazy=True)
        self._close()

    def _close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._reader = self._sock = None

    def _log(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:].strip() or "(no output)"


def is_mounted(mountpoint: Path) -> bool:
    """Whether ``mountpoint`` is a mount point in this mount namespace (from mountinfo)."""
    target = str(Path(mountpoint).resolve())
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _unmount(mountpoint: Path, lazy: bool = False) -> int:
    cmd = ["fusermount3", "-uz" if lazy else "-u", "-q", str(mountpoint)]
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


# --- the FUSE process ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    op: str
    match: str
    after: int
    errno: int


class _Faults:
    """The fault state, changed by the control thread and read by FUSE worker threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rules: list[_Rule] = []
        self.read_only = False
        self.hits: Counter[str] = Counter()

    def rule(self, op: str, *paths: str | None) -> _Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.op == op and any(p is not None and rule.match in p for p in paths):
                    return rule
        return None

    def check(self, op: str, *paths: str | None) -> None:
        """Raise the fault that applies to ``op`` on ``paths``, if any."""
        if op in MUTATING and self.read_only:
            self.hit("read_only")
            raise OSError(errnos.EROFS, os.strerror(errnos.EROFS))
        rule = self.rule(op, *paths)
        if rule is not None:
            self.hit(op)
            raise OSError(rule.errno, os.strerror(rule.errno))

    def hit(self, op: str) -> None:
        with self.lock:
            self.hits[op] += 1

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            if msg["cmd"] == "rule":
                self.rules.append(_Rule(msg["op"], msg["match"], msg["after"], msg["errno"]))
            elif msg["cmd"] == "read_only":
                self.read_only = bool(msg["on"])
            elif msg["cmd"] == "clear":
                self.rules.clear()
                self.read_only = False
            elif msg["cmd"] == "hits":
                return {"ok": True, "hits": dict(self.hits)}
        return {"ok": True}


def _serve(backing: str, mountpoint: str, control_fd: int) -> None:
    import mfusepy  # type: ignore[import-untyped]  # only the FUSE process loads libfuse

    faults = _Faults()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    control = socket.socket(fileno=control_fd)
    UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2

    def rel(path: str | None) -> str | None:
        return None if path is None else path.lstrip("/")

    class Passthrough(mfusepy.Operations):  # type: ignore[misc]
        use_ns = True

        def __init__(self) -> None:
            self.opened: dict[int, str] = {}  # fh -> path it was opened by (for fault matching)

        def _real(self, path: str) -> str:
            return os.path.join(backing, path.lstrip("/"))

        def init_with_config(self, conn: Any, config: Any) -> None:
            config.use_ino = 1
            config.hard_remove = 1  # unlink really unlinks: no .fuse_hidden files
            config.nullpath_ok = 1  # so open-but-unlinked files keep working through their fh
            config.kernel_cache = 0
            config.direct_io = 0
            config.entry_timeout = config.attr_timeout = config.negative_timeout = 0.0
            control.sendall(b"ready\n")

        def getattr(self, path: str | None, fh: Any = None) -> dict[str, Any]:
            faults.check("getattr", rel(path), self.opened.get(fh.fh) if fh is not None else None)
            st = os.fstat(fh.fh) if fh is not None else os.lstat(self._real(path or "/"))
            keys = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks")
            attrs: dict[str, Any] = {k: getattr(st, k) for k in keys}
            attrs.update(
                st_atime=st.st_atime_ns,
                st_mtime=st.st_mtime_ns,
                st_ctime=st.st_ctime_ns,
                st_blksize=st.st_blksize,
            )
            return attrs

        def _open(self, path: str, fi: Any, fd: int) -> int:
            fi.fh = fd
            fi.keep_cache = 0
            fi.direct_io = 0
            self.opened[fd] = rel(path) or ""
            return 0

        def open(self, path: str, fi: Any) -> int:
            if fi.flags & _WRITE_FLAGS and faults.read_only:
                faults.check("write")  # EROFS
            faults.check("open", rel(path))
            return self._open(path, fi, os.open(self._real(path), fi.flags))

        def create(self, path: str, mode: int, fi: Any) -> int:
            faults.check("create", rel(path))
            return self._open(path, fi, os.open(self._real(path), fi.flags | os.O_CREAT, mode))

        def read(self, path: str | None, size: int, offset: int, fh: Any) -> bytes:
            rule = faults.rule("read", self.opened.get(fh.fh))
            if rule is not None and offset + size > rule.after:
                # The whole request fails: a short read would be taken for end of file. The
                # kernel then retries page by page, so the pages before `after` still arrive.
                faults.hit("read")
                raise OSError(rule.errno, os.strerror(rule.errno))
            return os.pread(fh.fh, size, offset)

        def write(self, path: str | None, data: bytes, offset: int, fh: Any) -> int:
            if faults.read_only:
                faults.check("write")
            rule = faults.rule("write", self.opened.get(fh.fh))
            if rule is not None and offset + len(data) > rule.after:
                if offset >= rule.after:
                    faults.hit("write")
                    raise OSError(rule.errno, os.strerror(rule.errno))
                data = data[: rule.after - offset]  # a short write; the next one fails
            return os.pwrite(fh.fh, data, offset)

        def truncate(self, path: str | None, length: int, fh: Any = None) -> int:
            where, target = self._target(path, fh)
            faults.check("truncate", where)
            os.truncate(target, length)
            return 0

        def fallocate(self, path: str | None, mode: int, offset: int, size: int, fh: Any) -> int:
            where = self.opened.get(fh.fh)
            faults.check("fallocate", where)
            rule = faults.rule("write", where)
            if rule is not None and offset + size > rule.after:
                faults.hit("write")
                raise OSError(rule.errno, os.strerror(rule.errno))
            if libc.fallocate(fh.fh, mode, offset, size) != 0:  # any mode, e.g. KEEP_SIZE
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return 0

        def flock(self, path: str | None, fh: Any, op: int) -> int:
            # On the backing file: its inode is shared by hard links, unlike this mount's
            # per-name nodes, and the fill protocol locks a file under one name and checks
            # the lock under another. A blocking lock holds a FUSE worker thread meanwhile.
            fcntl.flock(fh.fh, op)
            return 0

        def fsync(self, path: str | None, datasync: int, fh: Any) -> int:
            faults.check("fsync", self.opened.get(fh.fh))
            (os.fdatasync if datasync else os.fsync)(fh.fh)
            return 0

        def flush(self, path: str | None, fh: Any) -> int:
            faults.check("flush", self.opened.get(fh.fh))
            return 0

        def release(self, path: str | None, fh: Any) -> int:
            self.opened.pop(fh.fh, None)
            os.close(fh.fh)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            faults.check("mkdir", rel(path))
            os.mkdir(self._real(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            faults.check("rmdir", rel(path))
            os.rmdir(self._real(path))
            return 0

        def unlink(self, path: str) -> int:
            faults.check("unlink", rel(path))
            os.unlink(self._real(path))
            return 0

        def rename(self, old: str, new: str) -> int:
            faults.check("rename", rel(old), rel(new))
            os.rename(self._real(old), self._real(new))
            return 0

        def link(self, target: str, source: str) -> int:  # target: the new name
            faults.check("link", rel(source), rel(target))
            os.link(self._real(source), self._real(target))
            return 0

        def symlink(self, target: str, source: str) -> int:  # target: the new name
            faults.check("symlink", rel(target))
            os.symlink(source, self._real(target))
            return 0

        def readlink(self, path: str) -> str:
            faults.check("readlink", rel(path))
            return os.readlink(self._real(path))

        def mknod(self, path: str, mode: int, dev: int) -> int:
            faults.check("mknod", rel(path))
            os.mknod(self._real(path), mode, dev)
            return 0

        def _target(self, path: str | None, fh: Any) -> tuple[str | None, int | str]:
            """The path to match faults on, and what to act on: the open file, else the path."""
            if fh is not None:
                return self.opened.get(fh.fh), fh.fh
            return rel(path), self._real(path or "/")

        def chmod(self, path: str | None, mode: int, fh: Any = None) -> int:
            where, target = self._target(path, fh)
            faults.check("chmod", where)
            os.chmod(target, mode)
            return 0

        def chown(self, path: str | None, uid: int, gid: int, fh: Any = None) -> int:
            where, target = self._target(path, fh)
            faults.check("chown", where)
            os.chown(target, uid, gid, follow_symlinks=not isinstance(target, str))
            return 0

        def utimens(self, path: str | None, times: Any = None, fh: Any = None) -> int:
            where, target = self._target(path, fh)
            faults.check("utimens", where)
            follow = not isinstance(target, str)  # an fd, or a path not to follow
            if times is None:
                os.utime(target, follow_symlinks=follow)
                return 0
            st, now = os.stat(target, follow_symlinks=follow), time.time_ns()
            current = (st.st_atime_ns, st.st_mtime_ns)
            atime, mtime = (
                now if t == UTIME_NOW else current[i] if t == UTIME_OMIT else int(t)
                for i, t in enumerate(times)
            )
            os.utime(target, ns=(atime, mtime), follow_symlinks=follow)
            return 0

        def opendir(self, path: str) -> int:
            fd = os.open(self._real(path), os.O_RDONLY | os.O_DIRECTORY)
            self.opened[fd] = rel(path) or ""
            return fd

        def readdir(self, path: str | None, fh: int) -> list[Any]:
            faults.check("readdir", self.opened.get(fh))
            # A fresh listing each time; with use_ino an entry needs its inode (0 is skipped).
            here = os.fstat(fh)
            listing: list[Any] = [
                (n, {"st_ino": here.st_ino, "st_mode": here.st_mode}, 0) for n in (".", "..")
            ]
            with os.scandir(f"/proc/self/fd/{fh}") as entries:
                for e in entries:
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                        mode = e.stat(follow_symlinks=False).st_mode
                        listing.append((e.name, {"st_ino": e.inode(), "st_mode": mode}, 0))
            return listing

        def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
            faults.check("fsync", self.opened.get(fh))
            os.fsync(fh)
            return 0

        def releasedir(self, path: str | None, fh: int) -> int:
            self.opened.pop(fh, None)
            os.close(fh)
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            faults.check("statfs", rel(path))
            sv = os.statvfs(self._real(path))
            keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files")
            return {
                k: getattr(sv, k) for k in (*keys, "f_ffree", "f_favail", "f_flag", "f_namemax")
            }

        def access(self, path: str, amode: int) -> int:
            os.stat(self._real(path))  # the kernel checks modes itself (default_permissions)
            return 0

    class FUSE(mfusepy.FUSE):  # type: ignore[misc]
        """mfusepy drops the handle of ftruncate/fchmod/fchown/futimens, and rename's flags.

        With nullpath_ok libfuse gives no path when it gives a handle, so without this those
        would act on the root (and flock fail); rename flags (RENAME_NOREPLACE...) are refused,
        not ignored.
        """

        def _path(self, path: bytes | None) -> str | None:
            return None if path is None else path.decode(self.encoding, self.errors)

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            fh = fip.contents if fip else None
            return int(self.operations.truncate(self._path(path), length, fh))

        def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
            return int(self.operations.chmod(self._path(path), mode, fip.contents if fip else None))

        def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
            uid = -1 if uid == 2**32 - 1 else uid
            gid = -1 if gid == 2**32 - 1 else gid
            fh = fip.contents if fip else None
            return int(self.operations.chown(self._path(path), uid, gid, fh))

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            times = None
            if buf:
                ts = (buf.contents.actime, buf.contents.modtime)
                times = tuple(t.tv_sec * 10**9 + t.tv_nsec for t in ts)
            fh = fip.contents if fip else None
            return int(self.operations.utimens(self._path(path), times, fh))

        def flock(self, path: bytes | None, fip: Any, op: int) -> int:
            return int(self.operations.flock(self._path(path), fip.contents, op))

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            if flags:
                return -errnos.EINVAL
            return int(self.operations.rename(self._path(old), self._path(new)))

    def control_loop() -> None:
        with control.makefile("rb") as lines:
            for line in lines:
                control.sendall(json.dumps(faults.command(json.loads(line))).encode() + b"\n")

    threading.Thread(target=control_loop, daemon=True).start()
    options: dict[str, Any] = {"fsname": "faultfs", "default_permissions": True}
    if os.geteuid() == 0:
        options["allow_other"] = True  # the code under test may run as another user
    FUSE(Passthrough(), mountpoint, raw_fi=True, foreground=True, **options)


if __name__ == "__main__":
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    try:
        _serve(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    except RuntimeError as e:  # libfuse's own status, e.g. after a lazy unmount by stop()
        sys.exit(f"faultfs: libfuse exited with {e}")
