"""The local demo: a real stack on loopback and a walk through what media-proxy does.

SeaweedFS stands in for Garage, Synapse runs with SQLite and the S3 provider, media-proxy
sits in front of Synapse's media endpoints and nginx (the shipped nginx/media-proxy.conf) in
front of both, as in production. A user uploads a few images and a short video; their files
are evicted from the local store (S3 keeps them); each is fetched twice through nginx: the
first time media-proxy streams it from S3 and writes it back, the second time it sends it
from the store. For each fetch the demo prints where the proxy says it served it from (its
JSON request log), how long it took, and whether the store was refilled.

With `--once` it stops after the walk-through (what CI runs); otherwise it keeps the stack up,
with its URLs and a login printed, until Ctrl-C. Re-running is safe: a run still going with the
same work dir is refused, parts left over by a killed run are stopped (by the PIDs it
recorded), and the work dir starts clean.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import importlib.util
import json
import os
import shutil
import signal
import struct
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Self

from media_proxy.devstack.procs import (
    LOOPBACK,
    ManagedProcess,
    StartupError,
    free_port,
    stop_all,
    tail,
)
from media_proxy.devstack.proxy import MediaProxy
from media_proxy.devstack.seaweed import SeaweedFS
from media_proxy.devstack.synapse import Synapse, local_content_key

REPO_ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "demo", "demo-password"
PROXY_WORKERS = 2


def say(message: str = "", *, end: str = "\n") -> None:
    print(message, end=end, flush=True)


# ---------------------------------------------------------------------------------------------
# nginx in front


def load_renderer() -> ModuleType:
    """nginx/render_test_config.py: a script beside the configs it renders, not a package."""
    name = "render_test_config"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "nginx" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise StartupError(f"cannot load {REPO_ROOT / 'nginx' / name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise StartupError("nginx is not installed: scripts/setup installs it (Debian: nginx)")
    return found


class Nginx:
    """Debian's nginx in the foreground with the shipped site (nginx/media-proxy.conf) rendered
    for loopback by nginx/render_test_config.py; stopped by its PID.

    X-Accel mode is on when ``accel_root`` (the proxy's cache directory) is given.
    """

    def __init__(
        self,
        prefix: Path,
        *,
        media_proxy: Sequence[str],
        synapse: str,
        server_name: str,
        accel_root: Path | None = None,
        client_max_body_size: str | None = None,
        port: int | None = None,
    ) -> None:
        self.prefix = prefix.resolve()
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.media_proxy = list(media_proxy)
        self.synapse = synapse
        self.server_name = server_name
        self.accel_root = accel_root
        self.client_max_body_size = client_max_body_size
        self.log_path = self.prefix / "logs" / "nginx.out"  # stdout and stderr
        self.error_log = self.prefix / "logs" / "error.log"
        self.access_log = self.prefix / "logs" / "access.log"
        self.process: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def start(self, timeout: float = 15.0) -> Self:
        renderer = load_renderer()
        renderer.render_test_config(
            self.prefix,
            listen=f"{LOOPBACK}:{self.port}",
            media_proxy=self.media_proxy,
            synapse=self.synapse,
            server_name=self.server_name,
            accel_root=self.accel_root,
            client_max_body_size=self.client_max_body_size,
        )
        argv: list[str] = renderer.nginx_command(self.prefix, nginx=nginx_binary())
        self.process = ManagedProcess("nginx", argv, log_path=self.log_path, stop_timeout=10.0)
        try:
            self.process.wait_for_port(self.port, timeout=timeout)
        except StartupError as e:
            self.process.stop()
            raise StartupError(
                f"{e}\nerror log {self.error_log}:\n{tail(self.error_log)}"
            ) from None
        return self

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        return [int(p) for p in children.split()]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


# ---------------------------------------------------------------------------------------------
# Sample media: real images and a real (tiny) video, made here without any imaging or codec
# library, so the demo needs nothing but Python.


def png(width: int, height: int, seed: int) -> bytes:
    """A real PNG (a colour gradient) without any imaging library."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            rows += bytes(((x * 255 // width + seed) % 256, (y * 255 // height) % 256, seed % 256))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(rows), 6))
        + chunk(b"IEND", b"")
    )


# A short H.264 video. No encoder is available (no ffmpeg), and none is needed for pictures
# this simple: the first frame is an IDR picture of raw (I_PCM) macroblocks, each later frame
# a P picture that re-codes only the macroblocks that changed and copies the others from the
# previous frame (P_Skip). The result is a valid Constrained Baseline stream in an MP4 that
# browsers and ffmpeg play (checked with FFmpeg's decoder: 45 frames, samples exact).
#
# Syntax and semantics: ITU-T H.264 sections 7.3 (SPS, PPS, slice header, slice data, I_PCM)
# and ISO/IEC 14496-12 / 14496-15 (MP4 boxes, avcC).


class _Bits:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> None:
        self.bits += [(value >> (n - 1 - i)) & 1 for i in range(n)]

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(2 * code.bit_length() - 1, code)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def align_zero(self) -> None:
        while len(self.bits) % 8:
            self.bits.append(0)

    def raw(self, data: bytes) -> None:
        assert len(self.bits) % 8 == 0
        for byte in data:
            self.u(8, byte)

    def rbsp(self) -> bytes:
        self.bits.append(1)  # rbsp_stop_one_bit
        self.align_zero()
        out = bytearray()
        for i in range(0, len(self.bits), 8):
            byte = 0
            for bit in self.bits[i : i + 8]:
                byte = byte << 1 | bit
            out.append(byte)
        return bytes(out)


def _nal(ref_idc: int, kind: int, rbsp: bytes) -> bytes:
    """A NAL unit: header byte, then the RBSP with emulation prevention bytes."""
    out = bytearray([ref_idc << 5 | kind])
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


PROFILE_BASELINE, CONSTRAINED, LEVEL = 66, 0xC0, 30  # Constrained Baseline, level 3.0
LOG2_MAX_FRAME_NUM = 4
PCM_I, PCM_P = 25, 30  # mb_type of I_PCM in an I slice, and in a P slice (5 + 25)


def _sps(mbs_wide: int, mbs_high: int) -> bytes:
    b = _Bits()
    b.u(8, PROFILE_BASELINE)
    b.u(8, CONSTRAINED)
    b.u(8, LEVEL)
    b.ue(0)  # seq_parameter_set_id
    b.ue(LOG2_MAX_FRAME_NUM - 4)
    b.ue(2)  # pic_order_cnt_type 2: output order is decoding order
    b.ue(1)  # max_num_ref_frames
    b.u(1, 0)  # gaps_in_frame_num_value_allowed_flag
    b.ue(mbs_wide - 1)
    b.ue(mbs_high - 1)
    b.u(1, 1)  # frame_mbs_only_flag
    b.u(1, 1)  # direct_8x8_inference_flag
    b.u(1, 0)  # frame_cropping_flag
    b.u(1, 0)  # vui_parameters_present_flag
    return _nal(3, 7, b.rbsp())


def _pps() -> bytes:
    b = _Bits()
    b.ue(0)  # pic_parameter_set_id
    b.ue(0)  # seq_parameter_set_id
    b.u(1, 0)  # entropy_coding_mode_flag: CAVLC
    b.u(1, 0)  # bottom_field_pic_order_in_frame_present_flag
    b.ue(0)  # num_slice_groups_minus1
    b.ue(0)  # num_ref_idx_l0_default_active_minus1
    b.ue(0)  # num_ref_idx_l1_default_active_minus1
    b.u(1, 0)  # weighted_pred_flag
    b.u(2, 0)  # weighted_bipred_idc
    b.se(0)  # pic_init_qp_minus26
    b.se(0)  # pic_init_qs_minus26
    b.se(0)  # chroma_qp_index_offset
    b.u(1, 1)  # deblocking_filter_control_present_flag
    b.u(1, 0)  # constrained_intra_pred_flag
    b.u(1, 0)  # redundant_pic_cnt_present_flag
    return _nal(3, 8, b.rbsp())


Frame = tuple[bytes, bytes, bytes]  # Y, Cb, Cr planes (4:2:0, 8 bits, row-major)


def _pcm(frame: Frame, width: int, mx: int, my: int) -> bytes:
    """The 384 samples of one macroblock: 16x16 luma, then 8x8 Cb and 8x8 Cr."""
    y, cb, cr = frame
    out = bytearray()
    for row in range(16):
        start = (my * 16 + row) * width + mx * 16
        out += y[start : start + 16]
    for plane in (cb, cr):
        for row in range(8):
            start = (my * 8 + row) * (width // 2) + mx * 8
            out += plane[start : start + 8]
    return bytes(out)


def _slice(
    frame: Frame, width: int, height: int, index: int, coded: set[tuple[int, int]] | None
) -> bytes:
    """One picture as one slice: an IDR of I_PCM macroblocks (`coded` None), or a P picture
    whose `coded` macroblocks are I_PCM and all others P_Skip (a copy of the previous one)."""
    idr = coded is None
    b = _Bits()
    b.ue(0)  # first_mb_in_slice
    b.ue(7 if idr else 5)  # slice_type: I or P (all slices of the picture alike)
    b.ue(0)  # pic_parameter_set_id
    b.u(LOG2_MAX_FRAME_NUM, index % (1 << LOG2_MAX_FRAME_NUM))  # frame_num
    if idr:
        b.ue(0)  # idr_pic_id
    else:
        b.u(1, 0)  # num_ref_idx_active_override_flag
        b.u(1, 0)  # ref_pic_list_modification_flag_l0
    if idr:
        b.u(1, 0)  # no_output_of_prior_pics_flag
        b.u(1, 0)  # long_term_reference_flag
    else:
        b.u(1, 0)  # adaptive_ref_pic_marking_mode_flag
    b.se(0)  # slice_qp_delta
    b.ue(1)  # disable_deblocking_filter_idc: off (nothing to smooth in raw samples)
    skipped = 0
    for my in range(height // 16):
        for mx in range(width // 16):
            if coded is not None and (mx, my) not in coded:
                skipped += 1
                continue
            if coded is not None:
                b.ue(skipped)  # mb_skip_run
                skipped = 0
            b.ue(PCM_I if idr else PCM_P)
            b.align_zero()  # pcm_alignment_zero_bit
            b.raw(_pcm(frame, width, mx, my))
    if skipped:
        b.ue(skipped)
    return _nal(3, 5 if idr else 1, b.rbsp())


def _box(kind: bytes, *parts: bytes) -> bytes:
    body = b"".join(parts)
    return struct.pack(">I", 8 + len(body)) + kind + body


def _full_box(kind: bytes, version: int, flags: int, *parts: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags), *parts)


_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _moov(
    width: int,
    height: int,
    sps: bytes,
    pps: bytes,
    sizes: list[int],
    tick: int,
    timescale: int,
    offset: int,
) -> bytes:
    duration = tick * len(sizes)
    mvhd = _full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, timescale, duration),
        struct.pack(">IH10x", 0x10000, 0x100),
        _MATRIX,
        bytes(24),
        struct.pack(">I", 2),
    )
    tkhd = _full_box(
        b"tkhd",
        0,
        3,
        struct.pack(">IIIII", 0, 0, 1, 0, duration),
        bytes(8),
        struct.pack(">hhhH", 0, 0, 0, 0),
        _MATRIX,
        struct.pack(">II", width << 16, height << 16),
    )
    mdhd = _full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, timescale, duration, 0x55C4, 0))
    hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, b"vide"), b"VideoHandler\0")
    avcc = _box(
        b"avcC",
        bytes([1, PROFILE_BASELINE, CONSTRAINED, LEVEL, 0xFF, 0xE1]),
        struct.pack(">H", len(sps)),
        sps,
        b"\x01",
        struct.pack(">H", len(pps)),
        pps,
    )
    avc1 = _box(
        b"avc1",
        bytes(6),
        struct.pack(">H", 1),
        bytes(16),
        struct.pack(">HH", width, height),
        struct.pack(">II", 0x480000, 0x480000),
        bytes(4),
        struct.pack(">H", 1),
        bytes(32),
        struct.pack(">Hh", 0x18, -1),
        avcc,
    )
    stbl = _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1),
        _full_box(b"stts", 0, 0, struct.pack(">III", 1, len(sizes), tick)),
        _full_box(b"stss", 0, 0, struct.pack(">II", 1, 1)),
        _full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, len(sizes), 1)),
        _full_box(b"stsz", 0, 0, struct.pack(f">II{len(sizes)}I", 0, len(sizes), *sizes)),
        _full_box(b"stco", 0, 0, struct.pack(">II", 1, offset)),
    )
    minf = _box(
        b"minf",
        _full_box(b"vmhd", 0, 1, bytes(8)),
        _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1))),
        stbl,
    )
    return _box(b"moov", mvhd, _box(b"trak", tkhd, _box(b"mdia", mdhd, hdlr, minf)))


def mp4(frames: list[Frame], width: int, height: int, fps: int) -> bytes:
    """An MP4 (ISO BMFF, moov first) of H.264 Constrained Baseline: the first frame an IDR
    picture of raw (I_PCM) macroblocks, every later one a P picture re-coding only the
    macroblocks that changed and copying the rest from the previous picture (P_Skip)."""
    assert width % 16 == 0 and height % 16 == 0
    sps, pps = _sps(width // 16, height // 16), _pps()
    samples = []
    previous: Frame | None = None
    for index, frame in enumerate(frames):
        coded = None if previous is None else _changed(previous, frame, width, height)
        nal = _slice(frame, width, height, index, coded)
        samples.append(struct.pack(">I", len(nal)) + nal)
        previous = frame
    ftyp = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isomiso2avc1mp41")
    sizes = [len(s) for s in samples]
    timescale = fps * 100
    head = len(ftyp) + len(_moov(width, height, sps, pps, sizes, 100, timescale, 0)) + 8
    moov = _moov(width, height, sps, pps, sizes, 100, timescale, head)
    return ftyp + moov + _box(b"mdat", *samples)


def _changed(a: Frame, b: Frame, width: int, height: int) -> set[tuple[int, int]]:
    return {
        (mx, my)
        for my in range(height // 16)
        for mx in range(width // 16)
        if _pcm(a, width, mx, my) != _pcm(b, width, mx, my)
    }


def bouncing_square(width: int = 160, height: int = 96, seconds: int = 3, fps: int = 15) -> bytes:
    """A few seconds of a square bouncing over a colour gradient."""
    yb = bytes(max(1, 16 + (x * 200 // width)) for y in range(height) for x in range(width))
    cbb = bytes(
        64 + (y * 128 // (height // 2)) for y in range(height // 2) for x in range(width // 2)
    )
    crb = bytes(
        192 - (x * 128 // (width // 2)) for y in range(height // 2) for x in range(width // 2)
    )
    frames: list[Frame] = []
    size, x, y, dx, dy = 24, 8, 8, 5, 3
    for _ in range(seconds * fps):
        luma, cb, cr = bytearray(yb), bytearray(cbb), bytearray(crb)
        for row in range(y, y + size):
            luma[row * width + x : row * width + x + size] = b"\xeb" * size
        for row in range(y // 2, (y + size) // 2):
            cb[row * (width // 2) + x // 2 : row * (width // 2) + (x + size) // 2] = b"\x30" * (
                size // 2
            )
            cr[row * (width // 2) + x // 2 : row * (width // 2) + (x + size) // 2] = b"\xd0" * (
                size // 2
            )
        frames.append((bytes(luma), bytes(cb), bytes(cr)))
        if not 0 <= x + dx <= width - size:
            dx = -dx
        if not 0 <= y + dy <= height - size:
            dy = -dy
        x, y = x + dx, y + dy
    return mp4(frames, width, height, fps)


@dataclass(frozen=True)
class Sample:
    name: str
    content_type: str
    what: str
    data: bytes


def samples() -> list[Sample]:
    return [
        Sample("sunrise.png", "image/png", "PNG 640x480", png(640, 480, 40)),
        Sample("harbour.png", "image/png", "PNG 1600x1200", png(1600, 1200, 160)),
        Sample("bounce.mp4", "video/mp4", "H.264 160x96 3 s", bouncing_square()),
        Sample(
            "archive.bin",
            "application/octet-stream",
            "random bytes, a big file",
            os.urandom(24 * 1024 * 1024),
        ),
    ]


# ---------------------------------------------------------------------------------------------
# The walk-through


@dataclass
class Fetch:
    status: int
    ok: bool  # 200 and exactly the uploaded bytes
    ms: float
    source: str  # the proxy's `source`: cache | s3 | s3-uncached | synapse | proxy | ?


class ProxyLog:
    """Reads the `request` events media-proxy appends to its log (JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0

    def next_source(self, media_id: str, timeout: float = 3.0) -> str:
        """The source of the next request logged for `media_id` (a worker logs it just after
        the answer went out, so wait for it a little)."""
        deadline = time.monotonic() + timeout
        while True:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            lines = data.split(b"\n")
            for i, line in enumerate(lines[:-1]):  # the last piece may be half written
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("event") == "request" and event.get("media_id") == media_id:
                    self.offset += sum(len(x) + 1 for x in lines[: i + 1])
                    return str(event.get("source", "?"))
            if time.monotonic() > deadline:
                return "?"
            time.sleep(0.02)


def fetch(base_url: str, path: str, token: str, expected: bytes) -> tuple[int, bool, float]:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        started = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        body = resp.read()
        ms = (time.perf_counter() - started) * 1000
    finally:
        conn.close()
    ok = resp.status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    return resp.status, ok, ms


@dataclass
class Row:
    sample: Sample
    media_id: str
    fetches: list[Fetch]
    refilled: bool

    @property
    def ok(self) -> bool:
        return (
            all(f.ok for f in self.fetches)
            and self.refilled
            and [f.source for f in self.fetches] == ["s3", "cache"]
        )


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


def walk_through(stack: DemoStack, token: str) -> list[Row]:
    """Upload the samples, evict them, fetch each twice through nginx; print a table."""
    rows: list[Row] = []
    say(
        f"\n  {'file':12} {'what':25} {'size':>9}   {'1st fetch (evicted)':22}"
        f" {'2nd fetch':22} store"
    )
    for sample in samples():
        uri = stack.synapse.upload(
            token, sample.data, content_type=sample.content_type, filename=sample.name
        )
        media_id = uri.rsplit("/", 1)[1]
        stored = stack.synapse.media_store_path / local_content_key(media_id)
        stored.unlink()  # evicted: S3 holds the only copy now
        path = f"/_matrix/client/v1/media/download/{stack.synapse.server_name}/{media_id}"
        fetches = []
        log = ProxyLog(stack.proxy.log_path)
        for _ in range(2):
            status, ok, ms = fetch(stack.nginx.url, path, token, sample.data)
            fetches.append(Fetch(status, ok, ms, log.next_source(media_id)))
        refilled = stored.exists() and stored.read_bytes() == sample.data
        row = Row(sample, media_id, fetches, refilled)
        rows.append(row)
        cells = [
            f"{f.source:6} {f.ms:8.1f} ms {'ok' if f.ok else f'BAD {f.status}':5}" for f in fetches
        ]
        say(
            f"  {sample.name:12} {sample.what:25} {_size(len(sample.data)):>9}   "
            f"{cells[0]:22} {cells[1]:22} {'refilled' if refilled else 'NOT REFILLED'}"
        )
    say(
        "\n  source (media-proxy's request log): s3 = missing from the store, streamed from S3"
        "\n  while written back; cache = sent from the local store with sendfile."
    )
    return rows


# ---------------------------------------------------------------------------------------------
# The stack


@dataclass
class DemoStack:
    work: Path
    seaweed: SeaweedFS
    synapse: Synapse
    proxy: MediaProxy
    nginx: Nginx


class Progress:
    """Numbered steps, each line finished with its time, or the part that failed."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.current = ""

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        self.done += 1
        self.current = what
        say(f"==> [{self.done}/{self.total}] {what} ... ", end="")
        started = time.monotonic()
        try:
            yield
        except BaseException:
            say("FAILED")
            raise
        say(f"ready ({time.monotonic() - started:.1f} s)")


class Parts:
    """The PIDs of the parts a run started, in <work>/parts.json, so that a later run can
    stop what a killed run left behind (only processes whose command line names the work
    dir: a recycled PID is left alone)."""

    def __init__(self, work: Path) -> None:
        self.path = work / "parts.json"
        self.work = work

    def record(self, name: str, process: ManagedProcess | None) -> None:
        if process is None:
            return
        known = self.read()
        known[name] = process.pid
        self.path.write_text(json.dumps(known))

    def read(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def _ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return False
        return str(self.work).encode() in cmdline

    def alive(self) -> dict[str, int]:
        return {name: pid for name, pid in self.read().items() if self._ours(pid)}

    def stop_leftovers(self) -> None:
        for name, pid in reversed(self.alive().items()):
            say(f"    stopping {name} (pid {pid}) left over by an earlier run")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while self._ours(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.path.unlink(missing_ok=True)


def _running_demo(pid_file: Path) -> int | None:
    """The PID of a demo still running with this work dir, if any."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if pid != os.getpid() and b"media_proxy.devstack.demo" in cmdline else None


def start_stack(work: Path, progress: Progress, parts: Parts) -> DemoStack:
    with progress.step("SeaweedFS, the S3 server standing in for Garage"):
        seaweed = SeaweedFS(work / "seaweedfs")
        seaweed.launch()
        parts.record("seaweedfs", seaweed.process)
        seaweed.wait_ready()
        s3 = seaweed.create_bucket("media")
    with progress.step("Synapse (SQLite, synapse-s3-storage-provider)"):
        synapse = Synapse(work / "synapse", s3=s3)
        synapse.launch()
        parts.record("synapse", synapse.process)
        synapse.wait_ready()
    with progress.step(f"media-proxy ({PROXY_WORKERS} workers)"):
        proxy = MediaProxy(
            work / "media-proxy",
            synapse_config=synapse.config_path,
            synapse_url=synapse.url,
            workers=PROXY_WORKERS,
        ).start()
        parts.record("media-proxy", proxy.process)
    with progress.step("nginx in front (nginx/media-proxy.conf)"):
        nginx = Nginx(
            work / "nginx",
            media_proxy=[proxy.url.removeprefix("http://")],
            synapse=synapse.url.removeprefix("http://"),
            server_name=synapse.server_name,
            client_max_body_size=str(synapse.config["max_upload_size"]),
        ).start()
        parts.record("nginx", nginx.process)
    return DemoStack(work, seaweed, synapse, proxy, nginx)


def run(work: Path, *, once: bool) -> int:
    """Everything `scripts/demo` does after setup; returns the exit status."""
    work = work.resolve()
    pid_file = work / "demo.pid"
    other = _running_demo(pid_file)
    if other is not None:
        say(f"a demo is already running with {work} (pid {other}): Ctrl-C it, or use --workdir")
        return 1
    parts = Parts(work)
    parts.stop_leftovers()
    shutil.rmtree(work, ignore_errors=True)  # a re-run starts clean
    work.mkdir(parents=True)
    pid_file.write_text(str(os.getpid()))
    progress = Progress(total=5)
    try:
        stack = start_stack(work, progress, parts)
        with progress.step(f"user @{USER}:{stack.synapse.server_name}"):
            token = stack.synapse.register_user(USER, PASSWORD)
        say("\nUploading samples to Synapse, evicting them, fetching each twice through nginx:")
        rows = walk_through(stack, token)
    except Exception as e:  # a failed part says which and where its log is (StartupError)
        say(f"\ndemo failed at {progress.current!r}: {e}")
        stop_all()
        parts.stop_leftovers()
        pid_file.unlink(missing_ok=True)
        return 1
    ok = all(row.ok for row in rows)
    if not ok:
        say("\nSOMETHING WENT WRONG: see the rows above and the logs under " + str(work))
    if not once:
        show_and_wait(stack, rows)
    say("stopping everything the demo started")
    stop_all()
    parts.stop_leftovers()
    pid_file.unlink(missing_ok=True)
    return 0 if ok else 1


def show_and_wait(stack: DemoStack, rows: list[Row]) -> None:
    sn = stack.synapse.server_name
    example = rows[0].media_id if rows else "MEDIA_ID"
    bucket = stack.synapse.s3.bucket if stack.synapse.s3 else "?"
    info = [
        ("homeserver", f"{stack.nginx.url}  (nginx: point Element or curl here)"),
        ("login", f"@{USER}:{sn}  password {PASSWORD}"),
        ("media-proxy", stack.proxy.url),
        ("synapse", stack.synapse.url),
        ("S3", f"{stack.seaweed.endpoint_url}  bucket {bucket}"),
        ("logs", f"{stack.proxy.log_path}, {stack.synapse.log_path}, {stack.nginx.prefix}/logs/"),
    ]
    say("\nThe stack stays up until Ctrl-C:")
    for key, value in info:
        say(f"  {key:12} {value}")
    say(
        "\n  try:  TOKEN=$(curl -s -XPOST "
        f"{stack.nginx.url}/_matrix/client/v3/login -d "
        f'\'{{"type":"m.login.password","user":"{USER}","password":"{PASSWORD}"}}\''
        " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"access_token\"])')"
        f'\n        curl -sI -H "Authorization: Bearer $TOKEN" '
        f"{stack.nginx.url}/_matrix/client/v1/media/download/{sn}/{example}"
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    say("")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="stop after the walk-through")
    parser.add_argument(
        "--workdir", type=Path, default=REPO_ROOT / ".demo", help="files and logs (default .demo)"
    )
    args = parser.parse_args(argv)
    return run(args.workdir, once=args.once)


if __name__ == "__main__":
    sys.exit(main())
