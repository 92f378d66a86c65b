"""The README's first command: `scripts/demo` (setup, then `python -m devstack.demo`).

Runs the demo module as a child process exactly as scripts/demo does after setup, with its own
work dir: SeaweedFS, Synapse (SQLite + S3 provider), media-proxy and nginx, all on loopback.
Checks the walk-through's table (every sample streamed from S3 on the first fetch, sent from
the store on the second, the store refilled), that `--once` leaves no process behind, and that
without it the stack stays up (usable through nginx with the printed login) until Ctrl-C, with
a second run on the same work dir refused meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devstack.demo import PASSWORD, USER, Parts
from devstack.samples import bouncing_square, samples
from devstack.seaweed import grpc_sockets_of
from tests.integration.media import request

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "devstack.demo"]
ROW = re.compile(
    r"^  (?P<name>\S+) .* (?P<s1>\S+) +(?P<ms1>[\d.]+) ms (?P<ok1>\S+) +"
    r"(?P<s2>\S+) +(?P<ms2>[\d.]+) ms (?P<ok2>\S+) +(?P<store>refilled|NOT REFILLED)$"
)


def processes_naming(path: Path) -> list[int]:
    """PIDs whose command line mentions `path` (what the demo started there)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline:
            found.append(int(entry.name))
    return found


def wait_gone(path: Path, timeout: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := processes_naming(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def stop(proc: subprocess.Popen[bytes], work: Path) -> None:
    """Whatever happened in the test: Ctrl-C the demo, kill it if that does not end it, then
    stop any part it left behind (by the PIDs it recorded in its work dir)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout:
        proc.stdout.close()
    Parts(work).stop_leftovers()


def table(output: str) -> dict[str, re.Match[str]]:
    return {m["name"]: m for line in output.splitlines() if (m := ROW.match(line))}


def test_demo_once_walks_through_and_stops(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [*DEMO, "--once", "--workdir", str(work)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        Parts(work).stop_leftovers()  # only if it was killed by the timeout
    took = time.monotonic() - started
    print(done.stdout, done.stderr, f"demo --once took {took:.1f} s", sep="\n")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = table(done.stdout)
    assert sorted(rows) == sorted(s.name for s in samples()), done.stdout
    for name, row in rows.items():
        assert (row["s1"], row["ok1"], row["s2"], row["ok2"]) == ("s3", "ok", "cache", "ok"), name
        assert row["store"] == "refilled", name
    for part in ("SeaweedFS", "Synapse", "media-proxy", "nginx"):
        assert re.search(rf"==> \[\d/\d\] {part}.* ready \(", done.stdout), part
    assert wait_gone(work) == []
    assert took < 180


def read_until(proc: subprocess.Popen[bytes], marker: str, timeout: float) -> str:
    """The child's output up to and including the line holding `marker` (raw reads: a
    buffered reader would keep lines the selector no longer reports)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while not re.search(re.escape(marker.encode()) + b".*\n", out):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} in the demo's output:\n{out.decode()}")
        if sel.select(left):
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"demo exited ({proc.wait()}):\n{out.decode()}")
            out += chunk
    return out.decode()


def test_demo_stays_up_until_ctrl_c_and_reruns_safely(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [*DEMO, "--workdir", str(work)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        out = read_until(proc, "  logs ", timeout=240)
        match = re.search(r"^  homeserver +(http://127\.0\.0\.1:\d+)", out, re.M)
        assert match, out
        homeserver = match[1]
        assert request(homeserver, "/_matrix/client/versions").status == 200
        login = request(
            homeserver,
            "/_matrix/client/v3/login",
            method="POST",
            headers=[("Content-Type", "application/json")],
            body=json.dumps(
                {"type": "m.login.password", "user": USER, "password": PASSWORD}
            ).encode(),
        )
        assert login.status == 200, login.body

        # A second run on the same work dir while this one is up is refused, harmlessly.
        again = subprocess.run(
            [*DEMO, "--once", "--workdir", str(work)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 1 and "already running" in again.stdout, again.stdout
        assert request(homeserver, "/_matrix/client/versions").status == 200

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
        assert wait_gone(work) == []
    finally:
        stop(proc, work)


def test_demo_rerun_stops_parts_left_by_a_killed_run(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [*DEMO, "--workdir", str(work)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        read_until(proc, "  logs ", timeout=240)
        proc.kill()  # no atexit, no clean-up: its parts (own sessions) keep running
        proc.wait()
        left = processes_naming(work)
        assert left, "the parts should have outlived a SIGKILLed demo"
        weed_sockets = [path for pid in left for path in grpc_sockets_of(pid)]
        assert weed_sockets and all(path.exists() for path in weed_sockets)
        done = subprocess.run(
            [*DEMO, "--once", "--workdir", str(work)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "left over by an earlier run" in done.stdout
        assert wait_gone(work) == []
        # Nor does it leave the killed run's SeaweedFS sockets in /tmp.
        assert [path for path in weed_sockets if path.exists()] == []
    finally:
        stop(proc, work)


def boxes(data: bytes, start: int = 0, end: int | None = None) -> dict[bytes, tuple[int, int]]:
    """Top-level ISO BMFF boxes in data[start:end]: type -> (payload offset, payload end)."""
    end = len(data) if end is None else end
    out = {}
    while start < end:
        size, kind = struct.unpack(">I4s", data[start : start + 8])
        assert size >= 8 and start + size <= end, (kind, size)
        out[kind] = (start + 8, start + size)
        start += size
    assert start == end
    return out


def test_sample_video_is_a_well_formed_mp4() -> None:
    """The structure only: decoding it was checked once with FFmpeg (45 frames, exact samples),
    which is not installed here."""
    data = bouncing_square()
    top = boxes(data)
    assert list(top) == [b"ftyp", b"moov", b"mdat"]
    trak = boxes(data, *boxes(data, *top[b"moov"])[b"trak"])
    stbl = boxes(data, *boxes(data, *boxes(data, *trak[b"mdia"])[b"minf"])[b"stbl"])
    s, _ = stbl[b"stsz"]
    _, _, count = struct.unpack(">III", data[s : s + 12])
    sizes = struct.unpack(f">{count}I", data[s + 12 : s + 12 + 4 * count])
    c, _ = stbl[b"stco"]
    (offset,) = struct.unpack(">I", data[c + 8 : c + 12])
    mdat_start, mdat_end = top[b"mdat"]
    assert count == 45 and offset == mdat_start and sum(sizes) == mdat_end - mdat_start
    # Each sample is one length-prefixed NAL unit: an IDR slice (5) first, P slices (1) after.
    kinds = []
    at = offset
    for size in sizes:
        (length,) = struct.unpack(">I", data[at : at + 4])
        assert length == size - 4
        kinds.append(data[at + 4] & 0x1F)
        at += size
    assert kinds == [5] + [1] * 44
    assert len(data) < 200 * 1024
