"""paths.py: Synapse's media store layout, its component check and the jail check.

The last tests run Synapse's own `MediaFilePaths` (in the Synapse virtualenv, as a
subprocess) over the same table and require the same relative paths and the same refusals.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media_proxy import paths
from media_proxy.paths import PathError
from tests.unit.synapse_oracle import run_synapse

ID = "abcdefghijklmnopqrstuvwx"  # 24 letters, the shape of every Synapse-made id


# --- every path kind ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rel", "expected"),
    [
        (paths.local_media(ID), "local_content/ab/cd/efghijklmnopqrstuvwx"),
        (paths.local_media("abcde"), "local_content/ab/cd/e"),
        (paths.local_thumbnail_dir(ID), "local_thumbnails/ab/cd/efghijklmnopqrstuvwx"),
        (
            paths.local_thumbnail(ID, 32, 32, "image/jpeg", "crop"),
            "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/32-32-image-jpeg-crop",
        ),
        (
            paths.local_thumbnail(ID, 320, 240, "image/png", "scale"),
            "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/320-240-image-png-scale",
        ),
        (
            paths.local_thumbnail(ID, 96, 96, "image/webp", "crop"),
            "local_thumbnails/ab/cd/efghijklmnopqrstuvwx/96-96-image-webp-crop",
        ),
        (
            paths.remote_media("example.org", ID),
            "remote_content/example.org/ab/cd/efghijklmnopqrstuvwx",
        ),
        (
            paths.remote_media("example.org:8448", ID),
            "remote_content/example.org:8448/ab/cd/efghijklmnopqrstuvwx",
        ),
        (
            paths.remote_media("[::1]:8448", ID),
            "remote_content/[::1]:8448/ab/cd/efghijklmnopqrstuvwx",
        ),
        (
            paths.remote_thumbnail_dir("example.org", ID),
            "remote_thumbnail/example.org/ab/cd/efghijklmnopqrstuvwx",
        ),
        (
            # singular "remote_thumbnail", unlike "local_thumbnails"
            paths.remote_thumbnail("example.org", ID, 32, 32, "image/jpeg", "crop"),
            "remote_thumbnail/example.org/ab/cd/efghijklmnopqrstuvwx/32-32-image-jpeg-crop",
        ),
        (
            paths.url_cache_media("2026-11-24_AbCdEfGhIjKlMnOp"),
            "url_cache/2026-11-24/AbCdEfGhIjKlMnOp",
        ),
        (
            # a dated id: the character after the date is skipped whatever it is
            paths.url_cache_media("2026-11-24XAbCd"),
            "url_cache/2026-11-24/AbCd",
        ),
        (paths.url_cache_media(ID), "url_cache/ab/cd/efghijklmnopqrstuvwx"),
        (
            # not a full date: sharded like any other id
            paths.url_cache_media("2026-1-24_AbCd"),
            "url_cache/20/26/-1-24_AbCd",
        ),
    ],
)
def test_path_kinds(rel: str, expected: str) -> None:
    assert rel == expected


def test_dated_ids_are_sharded_outside_the_url_cache() -> None:
    assert paths.local_media("2026-11-24_AbCdEfGhIjKlMnOp") == (
        "local_content/20/26/-11-24_AbCdEfGhIjKlMnOp"
    )


def test_thumbnail_size_is_formatted_as_an_integer() -> None:
    assert paths.local_thumbnail(ID, 32.9, 0, "image/png", "scale").endswith(  # type: ignore[arg-type]
        "/32-0-image-png-scale"
    )


# --- refusals ----------------------------------------------------------------------------

BAD_IDS = [
    "",
    "a",
    "abc",
    "abcd",  # id[4:] would be empty
    "ab/cdefgh",
    "abcd/efgh",
    "abcd%2Fefgh",
    "ab cdefgh",
    "ab+cdefgh",
    "..cdefgh",
    "ab..efgh",
    "abcd..",
    "abcd.",
    "abcdé",
    "ébcdefgh",
    "ab\ncdefgh",
    "ab\0cdefgh",
]


@pytest.mark.parametrize("media_id", BAD_IDS)
@pytest.mark.parametrize(
    "build",
    [
        paths.local_media,
        paths.local_thumbnail_dir,
        lambda i: paths.local_thumbnail(i, 32, 32, "image/png", "crop"),
        lambda i: paths.remote_media("example.org", i),
        paths.url_cache_media,
    ],
    ids=["local", "local_thumb_dir", "local_thumb", "remote", "url_cache"],
)
def test_bad_ids_are_refused(build: Any, media_id: str) -> None:
    with pytest.raises(PathError):
        build(media_id)


@pytest.mark.parametrize(
    "server_name", ["", ".", "..", "a/b", "a b", "ex%41mple.org", "exämple.org", "a+b", "a\\b"]
)
def test_bad_server_names_are_refused(server_name: str) -> None:
    with pytest.raises(PathError):
        paths.remote_media(server_name, ID)
    with pytest.raises(PathError):
        paths.remote_thumbnail(server_name, ID, 32, 32, "image/png", "crop")


@pytest.mark.parametrize(
    "media_id", ["2026-11-24_", "2026-11-24", "2026-11-24_a/b", "2026-11-24_a b", "2026-11-24_.."]
)
def test_bad_url_cache_ids_are_refused(media_id: str) -> None:
    with pytest.raises(PathError):
        paths.url_cache_media(media_id)


@pytest.mark.parametrize("content_type", ["image", "", "image/png/x", "a/b/c/d"])
def test_thumbnail_types_need_exactly_one_slash(content_type: str) -> None:
    with pytest.raises(PathError):
        paths.local_thumbnail(ID, 32, 32, content_type, "crop")
    with pytest.raises(PathError):
        paths.remote_thumbnail("example.org", ID, 32, 32, content_type, "crop")


@pytest.mark.parametrize(
    ("content_type", "method"),
    [("image/svg+xml", "crop"), ("image/png", "cr/op"), ("image/png", "a b"), ("image/p%6Eg", "")],
)
def test_thumbnail_names_are_checked_as_components(content_type: str, method: str) -> None:
    with pytest.raises(PathError):
        paths.local_thumbnail(ID, 32, 32, content_type, method)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("abc", True),
        ("A-Z_0.9", True),
        ("[::1]:8448", True),
        ("...", True),  # only "", "." and ".." themselves are forbidden names
        ("", False),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("/", False),
        ("%2F", False),
        ("a b", False),
        ("a+b", False),
        ("é", False),
        ("a\tb", False),
        ("~", False),
    ],
)
def test_component(name: str, ok: bool) -> None:
    if ok:
        assert paths.component(name) == name
    else:
        with pytest.raises(PathError):
            paths.component(name)


def test_path_error_is_a_value_error() -> None:
    # callers (and Synapse's convention) catch ValueError
    with pytest.raises(ValueError, match="invalid path component"):
        paths.component("..")


# --- in_store: the jail check ------------------------------------------------------------


@pytest.mark.parametrize(
    ("root", "rel", "expected"),
    [
        ("/store", "local_content/ab/cd/ef", "/store/local_content/ab/cd/ef"),
        ("/store/", "local_content/ab/cd/ef", "/store/local_content/ab/cd/ef"),
        ("/srv/./media//store", "url_cache/x/y", "/srv/media/store/url_cache/x/y"),
        ("/srv/other/../store", "a", "/srv/store/a"),
        ("store", "local_content/ab/cd/ef", "store/local_content/ab/cd/ef"),
        ("/", "local_content/ab/cd/ef", "/local_content/ab/cd/ef"),
    ],
)
def test_in_store(root: str, rel: str, expected: str) -> None:
    assert paths.in_store(root, rel) == expected


@pytest.mark.parametrize(
    "rel",
    [
        "..",
        "../etc/passwd",
        "local_content/../../etc/passwd",
        "local_content/../local_content/ab",  # not normalized, even if it stays inside
        "/etc/passwd",
        "//etc/passwd",
        "a/./b",
        "a//b",
        "a/b/",
        "",
        ".",
        "./a",
    ],
)
def test_in_store_refuses_escapes_and_unnormalized_paths(rel: str) -> None:
    with pytest.raises(PathError):
        paths.in_store("/store", rel)


@given(st.lists(st.sampled_from(["a", "b", ".", "..", "", "/", "x.y", "..."]), max_size=6))
def test_in_store_stays_strictly_below_its_root_as_synapses_jail_check(parts: list[str]) -> None:
    """Whatever `rel` is, in_store either refuses it or names a path strictly below the root
    that normalizing (as Synapse's `_wrap_with_jail_check` does) leaves unchanged."""
    rel = "".join(parts)
    for root in ("/store", "/srv/./media//store/", "/", "store"):
        try:
            full = paths.in_store(root, rel)
        except PathError:
            continue
        base = os.path.normpath(root)
        assert os.path.normpath(full) == full
        assert os.path.commonpath((base, full)) == base
        assert full != base


def test_in_store_accepts_every_built_path(tmp_path: Path) -> None:
    rel = paths.remote_thumbnail("[::1]:8448", ID, 32, 32, "image/png", "crop")
    assert paths.in_store(str(tmp_path), rel) == str(tmp_path / rel)


def test_fill_name_is_stable_and_distinct() -> None:
    a = paths.fill_name("local_content/ab/cd/efgh")
    assert a == paths.fill_name("local_content/ab/cd/efgh")
    assert len(a) == 40
    assert set(a) <= set("0123456789abcdef")
    assert a != paths.fill_name("local_content/ab/cd/efgi")
    assert paths.FILL_DIR.startswith(paths.STATE_DIR + "/")
    assert not paths.STATE_DIR.startswith(("local_", "remote_", "url_cache"))


# --- differential: Synapse's MediaFilePaths ----------------------------------------------

# (our function, Synapse's method, arguments). Synapse's *_dir methods return absolute
# paths below the base path; the others relative ones.
_OURS: dict[str, Callable[..., str]] = {
    "local_media_filepath_rel": paths.local_media,
    "local_media_thumbnail_rel": paths.local_thumbnail,
    "local_media_thumbnail_dir": paths.local_thumbnail_dir,
    "remote_media_filepath_rel": paths.remote_media,
    "remote_media_thumbnail_rel": paths.remote_thumbnail,
    "remote_media_thumbnail_dir": paths.remote_thumbnail_dir,
    "url_cache_filepath_rel": paths.url_cache_media,
}
_IDS = [
    ID,
    "abcde",
    "2026-11-24_AbCdEfGhIjKlMnOp",
    "2026-11-24XAbCd",
    "2026-1-24_AbCd",
    "AB_-.[]:x",
    "ab.cdefg",
    *BAD_IDS,
    "2026-11-24_",
    "2026-11-24",
    "2026-11-24_a/b",
    "2026-11-24_..",
]
_SERVERS = [
    "example.org",
    "example.org:8448",
    "[::1]",
    "[::1]:8448",
    ":",
    "",
    ".",
    "..",
    "a/b",
    "a b",
    "exämple.org",
    "ex%41mple.org",
]
_THUMBS = [
    (32, 32, "image/jpeg", "crop"),
    (320, 240, "image/png", "scale"),
    (0, -1, "image/webp", "crop"),
    (32, 32, "image/", "crop"),
    (32, 32, "/", ""),
    (32, 32, "image", "crop"),
    (32, 32, "image/png/x", "crop"),
    (32, 32, "", "crop"),
    (32, 32, "image/svg+xml", "crop"),
    (32, 32, "image/png", "cr/op"),
    (32, 32, "image/png", ".."),
]


def _calls() -> list[tuple[str, list[Any]]]:
    calls: list[tuple[str, list[Any]]] = []
    for media_id in _IDS:
        calls.append(("local_media_filepath_rel", [media_id]))
        calls.append(("local_media_thumbnail_dir", [media_id]))
        calls.append(("url_cache_filepath_rel", [media_id]))
        calls.append(("local_media_thumbnail_rel", [media_id, 32, 32, "image/png", "crop"]))
        calls.append(("remote_media_filepath_rel", ["example.org", media_id]))
    for server in _SERVERS:
        calls.append(("remote_media_filepath_rel", [server, ID]))
        calls.append(("remote_media_thumbnail_dir", [server, ID]))
        calls.append(("remote_media_thumbnail_rel", [server, ID, 32, 32, "image/png", "crop"]))
    for thumb in _THUMBS:
        calls.append(("local_media_thumbnail_rel", [ID, *thumb]))
        calls.append(("remote_media_thumbnail_rel", ["example.org", ID, *thumb]))
    return calls


CALLS = _calls()

_SYNAPSE_SCRIPT = """
import json, sys
from synapse.media.filepath import MediaFilePaths
base = "/media_store"
fp = MediaFilePaths(base)
out = []
for method, args in json.load(sys.stdin):
    try:
        path = getattr(fp, method)(*args)
    except ValueError as e:
        out.append({"refused": str(e)})
        continue
    if path.startswith(base + "/"):  # the *_dir methods answer absolute paths
        path = path[len(base) + 1:]
    out.append({"path": path})
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def synapse_answers() -> list[dict[str, str]]:
    answers: list[dict[str, str]] = run_synapse(_SYNAPSE_SCRIPT, CALLS)
    assert len(answers) == len(CALLS)
    return answers


def test_same_paths_and_refusals_as_synapse(synapse_answers: list[dict[str, str]]) -> None:
    mismatches = []
    for (method, args), synapse in zip(CALLS, synapse_answers, strict=True):
        try:
            ours: dict[str, str] = {"path": _OURS[method](*args)}
        except PathError as e:
            ours = {"refused": str(e)}
        if ("path" in ours) != ("path" in synapse) or ours.get("path") != synapse.get("path"):
            mismatches.append((method, args, ours, synapse))
    assert mismatches == []
    # the table exercises both outcomes, so a broken oracle cannot pass silently
    assert sum("path" in a for a in synapse_answers) > 20
    assert sum("refused" in a for a in synapse_answers) > 20
