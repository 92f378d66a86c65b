"""lifecycle.py's pure parts: S3 key -> kind and ids (the inverse of paths.py, checked against
Synapse's own MediaFilePaths), and the orphan rule."""

from __future__ import annotations

import pytest

from media_proxy.inventory import Kind
from media_proxy.lifecycle import (
    URL_PREVIEW_EXPIRY_MS,
    KeyInfo,
    Rows,
    orphan_reason,
    parse_key,
    parse_kinds,
    thumbnail_names,
)
from tests.unit.synapse_oracle import run_synapse

ID = "abcdefghijklmnopqrstuvwx"
FID = "ZYXWVUTSRQPONMLKJIHGFEDC"
DATED = "2026-11-24_AbCdEfGhIjKlMnOp"

PARSED = [
    ("local_content/ab/cd/efghijklmnopqrstuvwx", KeyInfo(Kind.LOCAL_ORIGINAL, ID)),
    ("local_content/ab/cd/e", KeyInfo(Kind.LOCAL_ORIGINAL, "abcde")),
    (
        "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-jpeg-crop",
        KeyInfo(Kind.LOCAL_THUMBNAIL, ID, thumbnail="32-32-image-jpeg-crop"),
    ),
    (
        "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-x-icon-scale",
        KeyInfo(Kind.LOCAL_THUMBNAIL, ID, thumbnail="32-32-image-x-icon-scale"),
    ),
    (
        "remote_content/example.org/ZY/XW/VUTSRQPONMLKJIHGFEDC",
        KeyInfo(Kind.REMOTE_ORIGINAL, FID, server_name="example.org"),
    ),
    (
        "remote_content/example.org:8448/ZY/XW/VUTSRQPONMLKJIHGFEDC",
        KeyInfo(Kind.REMOTE_ORIGINAL, FID, server_name="example.org:8448"),
    ),
    (
        "remote_content/[::1]:8448/ZY/XW/VUTSRQPONMLKJIHGFEDC",
        KeyInfo(Kind.REMOTE_ORIGINAL, FID, server_name="[::1]:8448"),
    ),
    (
        "remote_thumbnail/example.org/ZY/XW/VUTSRQPONMLKJIHGFEDC/320-240-image-png-scale",
        KeyInfo(
            Kind.REMOTE_THUMBNAIL,
            FID,
            server_name="example.org",
            thumbnail="320-240-image-png-scale",
        ),
    ),
    (  # the legacy name, without the method
        "remote_thumbnail/example.org/ZY/XW/VUTSRQPONMLKJIHGFEDC/320-240-image-png",
        KeyInfo(
            Kind.REMOTE_THUMBNAIL, FID, server_name="example.org", thumbnail="320-240-image-png"
        ),
    ),
    ("url_cache/2026-11-24/AbCdEfGhIjKlMnOp", KeyInfo(Kind.URL_PREVIEW, DATED)),
    ("url_cache/ab/cd/efghijklmnopqrstuvwx", KeyInfo(Kind.URL_PREVIEW, ID)),
    (
        "url_cache_thumbnails/2026-11-24/AbCdEfGhIjKlMnOp/32-32-image-png-crop",
        KeyInfo(Kind.URL_PREVIEW, DATED, thumbnail="32-32-image-png-crop"),
    ),
    (
        "url_cache_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-png-crop",
        KeyInfo(Kind.URL_PREVIEW, ID, thumbnail="32-32-image-png-crop"),
    ),
]

GARBAGE = [
    "",
    "/",
    "local_content",
    "local_content/",
    "local_content/ab/cd",  # a folder, not a file
    "local_content/ab/cd/",
    "local_content/ab/cd/efgh/extra",
    "local_content/a/bcd/efgh",  # sharded wrongly: paths.py would not write it
    "local_content/abc/d/efgh",
    "local_content/ab/cd/ef+gh",  # a character Synapse never puts in a path
    "local_content/ab/cd/ef gh",
    "local_content/ab/cd/ef%2Fgh",
    "local_content/ab//cd/efgh",
    "/local_content/ab/cd/efgh",
    "local_content/ab/cd/efgh/",
    "./local_content/ab/cd/efgh",
    "local_content/./cd/efgh",
    "local_content/ab/cd/..",
    "local_content/../../etc/passwd",
    "local_content/ab/../../../etc/passwd",
    "../local_content/ab/cd/efgh",
    "local_content/ab/cd/..efgh/../x",
    "local_thumbnails/ab/cd/efghijklmnopqrstuvwx",  # the folder as an object
    "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/thumbnail.jpg",  # not Synapse's name
    "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32",
    "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/..",
    "remote_content/ZY/XW/VUTSRQPONMLKJIHGFEDC",  # no server name
    "remote_content/../XW/VU/TSRQPONMLKJIHGFEDC",
    "remote_content/exa mple.org/ZY/XW/VUTS",
    "remote_thumbnail/example.org/ZY/XW/VUTSRQPONMLKJIHGFEDC",
    "remote_thumbnails/example.org/ZY/XW/VUTSRQPONMLKJIHGFEDC/32-32-image-png-crop",
    "url_cache/2026-11-24",
    "url_cache/2026-11-24/a/b",
    "url_cache/20/26/-11-24xyz",  # would be a dated id: paths.py writes it elsewhere
    "url_cache_thumbnails/2026-11-24/AbCdEfGhIjKlMnOp",
    "local_media/ab/cd/efgh",
    "LOCAL_CONTENT/ab/cd/efgh",
    ".media-proxy/fill/0123456789",
    "backup.tar.gz",
    "local_content/ab/cd/efgh\n",
    "local_content/ab/cd/éfgh",
]


@pytest.mark.parametrize(("rel", "expected"), PARSED)
def test_keys_map_to_kind_and_ids(rel: str, expected: KeyInfo) -> None:
    assert parse_key(rel) == expected


@pytest.mark.parametrize("rel", GARBAGE)
def test_keys_synapse_never_writes_are_refused(rel: str) -> None:
    assert parse_key(rel) is None


_SYNAPSE_SCRIPT = """
import json, sys
from synapse.media.filepath import MediaFilePaths
p = MediaFilePaths("/store")
out = []
for kind, media_id, server, thumb in json.load(sys.stdin):
    if kind == "local_originals":
        out.append(p.local_media_filepath_rel(media_id))
    elif kind == "local_thumbnails":
        out.append(p.local_media_thumbnail_dir(media_id)[len("/store/"):] + "/" + thumb)
    elif kind == "remote_originals":
        out.append(p.remote_media_filepath_rel(server, media_id))
    elif kind == "remote_thumbnails":
        out.append(p.remote_media_thumbnail_dir(server, media_id)[len("/store/"):] + "/" + thumb)
    elif thumb:
        out.append(p.url_cache_thumbnail_directory_rel(media_id) + "/" + thumb)
    else:
        out.append(p.url_cache_filepath_rel(media_id))
print(json.dumps(out))
"""


def test_synapse_builds_the_same_keys_back() -> None:
    """Synapse's own MediaFilePaths turns the ids read from each key into that very key."""
    payload = [[i.kind.value, i.media_id, i.server_name, i.thumbnail] for _, i in PARSED]
    assert run_synapse(_SYNAPSE_SCRIPT, payload) == [rel for rel, _ in PARSED]


def test_thumbnail_names_with_and_without_method() -> None:
    assert thumbnail_names(32, 32, "image/jpeg", "crop") == (
        "32-32-image-jpeg-crop",
        "32-32-image-jpeg",
    )
    assert thumbnail_names(32, 32, "nonsense", "crop") == ()


NOW = 10_000_000_000_000
LOCAL = KeyInfo(Kind.LOCAL_ORIGINAL, ID)
LOCAL_THUMB = KeyInfo(Kind.LOCAL_THUMBNAIL, ID, thumbnail="32-32-image-jpeg-crop")
LOCAL_LEGACY = KeyInfo(Kind.LOCAL_THUMBNAIL, ID, thumbnail="32-32-image-jpeg")
REMOTE = KeyInfo(Kind.REMOTE_ORIGINAL, FID, server_name="example.org")
REMOTE_THUMB = KeyInfo(
    Kind.REMOTE_THUMBNAIL, FID, server_name="example.org", thumbnail="32-32-image-jpeg-crop"
)
PREVIEW = KeyInfo(Kind.URL_PREVIEW, DATED)
PREVIEW_THUMB = KeyInfo(Kind.URL_PREVIEW, DATED, thumbnail="32-32-image-jpeg-crop")
THUMBS = set(thumbnail_names(32, 32, "image/jpeg", "crop"))
FRESH = NOW - URL_PREVIEW_EXPIRY_MS + 1000
EXPIRED = NOW - URL_PREVIEW_EXPIRY_MS - 1000

ALL_ROWS = Rows(
    local={ID: (NOW, False), DATED: (FRESH, True)},
    local_thumbnails={ID: THUMBS, DATED: THUMBS},
    remote={("example.org", FID)},
    remote_thumbnails={("example.org", FID): THUMBS},
)


@pytest.mark.parametrize(
    ("info", "rows", "reason"),
    [
        (LOCAL, ALL_ROWS, None),
        (LOCAL_THUMB, ALL_ROWS, None),
        (LOCAL_LEGACY, ALL_ROWS, None),
        (REMOTE, ALL_ROWS, None),
        (REMOTE_THUMB, ALL_ROWS, None),
        (PREVIEW, ALL_ROWS, None),
        (PREVIEW_THUMB, ALL_ROWS, None),
        (LOCAL, Rows(), "media_row_gone"),
        (LOCAL_THUMB, Rows(), "media_row_gone"),
        (REMOTE, Rows(), "media_row_gone"),
        (REMOTE_THUMB, Rows(), "media_row_gone"),
        (PREVIEW, Rows(), "media_row_gone"),
        # same filesystem id under another origin is another media
        (REMOTE, Rows(remote={("other.org", FID)}), "media_row_gone"),
        (LOCAL_THUMB, Rows(local={ID: (NOW, False)}), "thumbnail_row_gone"),
        (REMOTE_THUMB, Rows(remote={("example.org", FID)}), "thumbnail_row_gone"),
        (PREVIEW, Rows(local={DATED: (EXPIRED, True)}), "url_preview_expired"),
        (PREVIEW_THUMB, Rows(local={DATED: (EXPIRED, True)}), "url_preview_expired"),
        # an old local media is not a preview: age alone never makes an orphan
        (LOCAL, Rows(local={ID: (EXPIRED, False)}), None),
    ],
)
def test_orphan_rule(info: KeyInfo, rows: Rows, reason: str | None) -> None:
    assert orphan_reason(info, rows, NOW) == reason


def test_kinds_flag() -> None:
    assert parse_kinds("local_originals, remote_thumbnails") == {
        Kind.LOCAL_ORIGINAL,
        Kind.REMOTE_THUMBNAIL,
    }
    assert len(parse_kinds(None)) == 5
    for bad in ("", "other", "local_originals,bogus", ","):
        with pytest.raises(Exception, match="--kinds"):
            parse_kinds(bad)
