"""Listing dates are parsed natively, and to the same instants botocore's parser gives."""

from __future__ import annotations

import datetime

import botocore.utils
import pytest

from media_proxy.s3 import _timestamp


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-01T10:11:12.000Z",  # SeaweedFS, AWS
        "2026-12-01T10:11:12Z",
        "2026-12-01T10:11:12.123456Z",
        "2026-12-01T10:11:12+02:00",
        "Tue, 01 Dec 2026 10:11:12 GMT",  # HTTP dates go to botocore's parser
        "1764583872",  # epoch seconds too
    ],
)
def test_same_instant_as_botocore(text: str) -> None:
    ours = _timestamp(text)
    assert ours.tzinfo is not None
    assert ours == botocore.utils.parse_timestamp(text)


def test_utc_when_no_zone_given() -> None:
    """botocore gives a naive datetime here; listing ages are compared with aware times."""
    naive = botocore.utils.parse_timestamp("2026-12-01T10:11:12")
    assert _timestamp("2026-12-01T10:11:12") == naive.replace(tzinfo=datetime.UTC)
