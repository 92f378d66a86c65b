"""tests/faultfs.py: a real FUSE passthrough mount that injects disk faults on demand."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faultfs import FaultFS, is_mounted

PAGE = 4096
FALLOC_FL_KEEP_SIZE = 1


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FaultFS]:
    faultfs = FaultFS(backing=tmp_path / "backing", mountpoint=tmp_path / "mnt").start()
    try:
        yield faultfs
    finally:
        faultfs.stop()


def read_all(path: Path, chunk: int = 65536) -> tuple[bytes, OSError | None]:
    """Read(2) from a fresh descriptor: the bytes that came, and the error that ended it."""
    got = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        while block := os.read(fd, chunk):
            got += block
    except OSError as e:
        return bytes(got), e
    finally:
        os.close(fd)
    return bytes(got), None


def sendfile_all(path: Path, out: Path) -> tuple[bytes, OSError | None]:
    """Copy with sendfile(2) from a fresh descriptor: the bytes that came, and the ending error."""
    error = None
    with open(path, "rb") as src, open(out, "wb") as dst:
        try:
            while os.sendfile(dst.fileno(), src.fileno(), None, 65536):
                pass
        except OSError as e:
            error = e
    return out.read_bytes(), error


def test_passthrough_reaches_the_backing_directory(fs: FaultFS) -> None:
    mnt, backing = fs.mountpoint, fs.backing
    (mnt / "a" / "b").mkdir(parents=True)
    fd = os.open(mnt / "a/b/fill", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with pytest.raises(FileExistsError):
        os.open(mnt / "a/b/fill", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.pwrite(fd, b"world", 6)
    os.pwrite(fd, b"hello ", 0)
    os.fsync(fd)
    os.posix_fallocate(fd, 0, 2 * PAGE)
    os.ftruncate(fd, 11)
    os.fchmod(fd, 0o640)  # the handle-only calls reach the open file, not the root
    os.utime(fd, ns=(1_000_000_000, 3_000_000_000))
    os.close(fd)
    st = (backing / "a/b/fill").stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 3_000_000_000)
    assert (backing / "a/b/fill").read_bytes() == b"hello world"
    assert (mnt / "a/b/fill").stat().st_size == 11  # a size changed behind the mount's back

    os.link(mnt / "a/b/fill", mnt / "a/final")  # the fill protocol links, then renames
    assert (mnt / "a/final").stat().st_nlink == 2
    with open(mnt / "a/b/fill", "ab") as grow:  # growth is seen at once through the other name
        grow.write(b"!")
    assert (mnt / "a/final").read_bytes() == b"hello world!"
    os.truncate(mnt / "a/final", 11)
    assert (backing / "a/final").stat().st_ino == (backing / "a/b/fill").stat().st_ino
    os.rename(mnt / "a/final", mnt / "a/renamed")
    os.chmod(mnt / "a/renamed", 0o644)
    os.utime(mnt / "a/renamed", ns=(1_000_000_000, 2_000_000_000))
    st = (backing / "a/renamed").stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o644, 2_000_000_000)
    assert sorted(os.listdir(mnt / "a")) == ["b", "renamed"]

    with open(mnt / "a/renamed", "rb") as held:  # unlinked while open: still readable
        os.unlink(mnt / "a/renamed")
        assert held.read() == b"hello world"
    assert os.listdir(backing / "a") == ["b"]  # no .fuse_hidden leftovers
    os.unlink(mnt / "a/b/fill")
    os.rmdir(mnt / "a/b")
    assert os.statvfs(mnt).f_bsize > 0


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["hard-linked file", "directory"])
def test_flock_is_exclusive_across_processes(fs: FaultFS, kind: str) -> None:
    """Another process's LOCK_EX is seen, and dropped when it exits (fill.py and evict.py).

    fill.py locks a private file, links it to the fill name and unlinks the private name;
    followers open the fill name and test the lock there, so the lock must follow the inode.
    """
    if kind == "directory":
        locked = seen = fs.mountpoint / "store"
        locked.mkdir()
    else:
        locked, seen = fs.mountpoint / "fill.private", fs.mountpoint / "fill"
        locked.touch()
        os.link(locked, seen)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(locked)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline() == b"locked\n"
        if kind != "directory":
            os.unlink(locked)  # as fill.py does: only the fill name is left
        fd = os.open(seen, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            holder.stdin.close()  # the holder exits: the kernel drops its lock
            assert holder.wait(5) == 0
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_sendfile_from_the_mount(fs: FaultFS, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    (fs.mountpoint / "f").write_bytes(data)
    assert sendfile_all(fs.mountpoint / "f", tmp_path / "out") == (data, None)


@pytest.mark.parametrize("copy", ["read", "sendfile"])
def test_read_fault_mid_file(fs: FaultFS, tmp_path: Path, copy: str) -> None:
    data = os.urandom(300_000)
    (fs.mountpoint / "local_content").mkdir()
    (fs.mountpoint / "local_content/f").write_bytes(data)
    (fs.mountpoint / "other").write_bytes(data)
    assert read_all(fs.mountpoint / "local_content/f") == (data, None)  # now in the page cache

    fs.fail_reads(match="local_content/", after=25 * PAGE)
    path = fs.mountpoint / "local_content/f"
    got, error = read_all(path) if copy == "read" else sendfile_all(path, tmp_path / "out")
    assert got == data[: 25 * PAGE]
    assert error is not None and error.errno == errno.EIO
    assert fs.hits()["read"] >= 1
    assert read_all(fs.mountpoint / "other") == (data, None)  # does not match

    fs.clear()
    assert read_all(fs.mountpoint / "local_content/f") == (data, None)


def test_read_fault_off_a_page_boundary_rounds_down(fs: FaultFS) -> None:
    (fs.mountpoint / "f").write_bytes(b"x" * 5 * PAGE)
    fs.fail_reads(after=2 * PAGE + 100, errno=errno.ENXIO)
    got, error = read_all(fs.mountpoint / "f")
    assert len(got) == 2 * PAGE
    assert error is not None and error.errno == errno.ENXIO


def test_write_faults(fs: FaultFS) -> None:
    fill = fs.mountpoint / ".media-proxy/fill"
    fill.mkdir(parents=True)
    fs.fail_writes(match=".media-proxy/fill/", errno=errno.EIO)
    with open(fill / "a", "wb", buffering=0) as f:
        with pytest.raises(OSError) as raised:
            f.write(b"x" * 100)
        assert raised.value.errno == errno.EIO
    (fs.mountpoint / "elsewhere").write_bytes(b"fine")  # does not match

    fs.clear()
    fs.fail_writes(match=".media-proxy/fill/", after=2 * PAGE, errno=errno.ENOSPC)
    fd = os.open(fill / "b", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert os.write(fd, b"y" * 5 * PAGE) == 2 * PAGE  # a short write up to the fault
        with pytest.raises(OSError) as raised:
            os.write(fd, b"y")
        assert raised.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert (fs.backing / ".media-proxy/fill/b").read_bytes() == b"y" * 2 * PAGE
    assert fs.hits()["write"] == 2

    fs.clear()
    (fill / "c").write_bytes(b"z" * 5 * PAGE)
    assert (fs.backing / ".media-proxy/fill/c").stat().st_size == 5 * PAGE


def fallocate_keep_size(fd: int, length: int) -> int:
    """fallocate(FALLOC_FL_KEEP_SIZE) as fill.reserve calls it: 0, or the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return 0 if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, length) == 0 else ctypes.get_errno()


def test_fallocate_passes_through_and_takes_write_faults(fs: FaultFS) -> None:
    fd = os.open(fs.mountpoint / "reserved", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert fallocate_keep_size(fd, 64 * PAGE) == 0
        st = (fs.backing / "reserved").stat()
        assert (st.st_size, st.st_blocks * 512 >= 64 * PAGE) == (0, True)  # blocks, no size
        fs.fail_writes(match="reserved", errno=errno.ENOSPC)
        assert fallocate_keep_size(fd, 128 * PAGE) == errno.ENOSPC
    finally:
        os.close(fd)


def test_read_only_refuses_every_change(fs: FaultFS) -> None:
    mnt = fs.mountpoint
    (mnt / "d").mkdir()
    (mnt / "d/f").write_bytes(b"kept")
    fs.read_only(True)
    changes: list[Callable[[], object]] = [
        lambda: os.open(mnt / "d/new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
        lambda: os.open(mnt / "d/f", os.O_WRONLY),
        lambda: os.mkdir(mnt / "e"),
        lambda: os.unlink(mnt / "d/f"),
        lambda: os.rename(mnt / "d/f", mnt / "d/g"),
        lambda: os.link(mnt / "d/f", mnt / "d/g"),
        lambda: os.truncate(mnt / "d/f", 0),
        lambda: os.chmod(mnt / "d/f", 0o600),
        lambda: os.rmdir(mnt / "d"),
    ]
    for change in changes:
        with pytest.raises(OSError) as raised:
            change()
        assert raised.value.errno == errno.EROFS
    assert (mnt / "d/f").read_bytes() == b"kept"  # reading still works
    assert fs.hits()["read_only"] == len(changes)

    fs.clear()
    os.rename(mnt / "d/f", mnt / "d/g")
    assert os.listdir(fs.backing / "d") == ["g"]


def test_fail_op(fs: FaultFS) -> None:
    (fs.mountpoint / "fill").mkdir()
    (fs.mountpoint / "media").mkdir()
    fs.fail_op("fsync", match="fill/")
    fs.fail_op("link", match="media/", errno=errno.ENOSPC)
    with open(fs.mountpoint / "fill/a", "wb") as f:
        f.write(b"data")
        f.flush()
        with pytest.raises(OSError) as raised:
            os.fsync(f.fileno())
        assert raised.value.errno == errno.EIO
    with pytest.raises(OSError) as raised:
        os.link(fs.mountpoint / "fill/a", fs.mountpoint / "media/a")
    assert raised.value.errno == errno.ENOSPC
    with pytest.raises(ValueError, match="unknown op 'frobnicate'"):
        fs.fail_op("frobnicate")


def test_stop_unmounts_and_leaves_no_process(tmp_path: Path) -> None:
    fs = FaultFS(backing=tmp_path / "backing", mountpoint=tmp_path / "mnt").start()
    pid = fs.pid
    assert is_mounted(fs.mountpoint)
    busy = os.open(fs.mountpoint / "open-during-stop", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fs.stop()  # busy: unmounted lazily, the process told to exit
        with pytest.raises(OSError) as raised:
            os.write(busy, b"x")
        assert raised.value.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            os.close(busy)
    assert not is_mounted(fs.mountpoint)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (fs.backing / "open-during-stop").exists()
