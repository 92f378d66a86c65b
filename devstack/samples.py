"""Sample media for the demo and tests: real images and a real (tiny) H.264 video, made here
without any imaging or codec library, so they need nothing but Python."""

from __future__ import annotations

import os
import struct
import zlib
from dataclasses import dataclass


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
