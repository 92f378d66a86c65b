"""Range decisions (media_proxy/ranges.py): table-driven cases and a property against a
slice-based reference."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media_proxy.ranges import ByteRange, Unsatisfiable, choose

L = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", ByteRange(0, 99, L)),
        ("bytes=100-", ByteRange(100, 999, L)),
        ("bytes=-100", ByteRange(900, 999, L)),
        ("bytes=-5000", ByteRange(0, 999, L)),  # a suffix longer than the file: all of it
        ("bytes=990-5000", ByteRange(990, 999, L)),  # clamped to the end
        ("bytes=999-999", ByteRange(999, 999, L)),
        ("BYTES = 0-0", ByteRange(0, 0, L)),  # the unit is case-insensitive
        ("bytes=1000-", Unsatisfiable(L)),
        ("bytes=1000-2000", Unsatisfiable(L)),
        ("bytes=-0", Unsatisfiable(L)),
        ("bytes=5-4", None),  # invalid: ignored
        ("bytes=0-1,5-9", None),  # several ranges: whole file
        ("bytes=-", None),
        ("bytes=a-b", None),
        ("bytes=+1-2", None),
        ("bytes=0x10-", None),
        ("items=0-10", None),
        ("bytes 0-10", None),
        ("", None),
    ],
)
def test_single_ranges(header: str, expected: ByteRange | Unsatisfiable | None) -> None:
    assert choose([header], [], L) == expected


def test_headers_given_twice_are_ignored() -> None:
    assert choose(["bytes=0-1", "bytes=0-1"], [], L) is None
    assert choose([], [], L) is None


def test_if_range_must_match_our_etag() -> None:
    assert choose(["bytes=0-1"], ["1"], L) == ByteRange(0, 1, L)
    assert choose(["bytes=0-1"], ['"1"'], L) is None
    assert choose(["bytes=0-1"], ["Wed, 21 Oct 2015 07:28:00 GMT"], L) is None
    assert choose(["bytes=0-1"], ["1", "1"], L) is None


def test_empty_file_has_no_satisfiable_range() -> None:
    assert choose(["bytes=0-"], [], 0) == Unsatisfiable(0)
    assert choose(["bytes=-1"], [], 0) == Unsatisfiable(0)


def test_content_range() -> None:
    assert ByteRange(0, 99, L).content_range() == "bytes 0-99/1000"
    assert Unsatisfiable(L).content_range() == "bytes */1000"
    assert ByteRange(5, 9, L).size == 5


@given(
    length=st.integers(0, 5000),
    first=st.one_of(st.none(), st.integers(0, 6000)),
    last=st.one_of(st.none(), st.integers(0, 6000)),
)
def test_matches_slicing(length: int, first: int | None, last: int | None) -> None:
    """Whatever is chosen selects exactly the bytes RFC 9110 says, as a slice would."""
    header = f"bytes={'' if first is None else first}-{'' if last is None else last}"
    got = choose([header], [], length)
    data = bytes(range(256)) * (length // 256 + 1)
    data = data[:length]
    if first is None and last is None:
        assert got is None
    elif first is None:
        assert last is not None
        if last == 0 or length == 0:
            assert got == Unsatisfiable(length)
        else:
            assert isinstance(got, ByteRange)
            assert data[got.start : got.end + 1] == data[-last:]
    elif last is not None and last < first:
        assert got is None
    elif first >= length:
        assert got == Unsatisfiable(length)
    else:
        assert isinstance(got, ByteRange)
        stop = length if last is None else last + 1
        assert data[got.start : got.end + 1] == data[first:stop]
        assert got.size == len(data[first:stop])
