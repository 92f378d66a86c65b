"""inventory.py and evict.py's pure parts on a temporary store: classification, the walk,
folder pruning, durations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from media_proxy.config import ConfigError, parse_duration
from media_proxy.evict import prune_empty_dirs
from media_proxy.inventory import Kind, classify, walk


@pytest.mark.parametrize(
    ("rel", "kind"),
    [
        ("local_content/ab/cd/efghijklmnopqrstuvwx", Kind.LOCAL_ORIGINAL),
        ("local_thumbnails/ab/cd/efgh/32-32-image-png-crop", Kind.LOCAL_THUMBNAIL),
        ("remote_content/example.org:8448/ab/cd/efgh", Kind.REMOTE_ORIGINAL),
        ("remote_thumbnail/[::1]:8448/ab/cd/efgh/32-32-image-png", Kind.REMOTE_THUMBNAIL),
        ("url_cache/2026-11-24/AbCdEfGhIjKlMnOp", Kind.URL_PREVIEW),
        ("url_cache_thumbnails/ab/cd/ef/32-32-image-png-crop", Kind.URL_PREVIEW),
        ("local_content/ab/stray", Kind.OTHER),
        ("remote_thumbnail/x/ab/cd/efgh", Kind.OTHER),
        (".media-proxy/fill/abc", None),
        ("homeserver.db", None),
    ],
)
def test_classify(rel: str, kind: Kind | None) -> None:
    assert classify(rel) == kind


def _touch(root: Path, rel: str, data: bytes = b"x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_walk_sees_media_folders_only(tmp_path: Path) -> None:
    _touch(tmp_path, "local_content/ab/cd/efgh", b"12345")
    _touch(tmp_path, "local_thumbnails/ab/cd/efgh/1-1-image-png-crop")
    _touch(tmp_path, ".media-proxy/fill/0123")
    _touch(tmp_path, "elsewhere/file")
    os.symlink("/etc/passwd", tmp_path / "local_content/ab/cd/link")
    os.mkfifo(tmp_path / "local_content/ab/cd/fifo")
    files = {f.rel: f for f in walk(str(tmp_path))}
    assert set(files) == {
        "local_content/ab/cd/efgh",
        "local_thumbnails/ab/cd/efgh/1-1-image-png-crop",
    }
    f = files["local_content/ab/cd/efgh"]
    assert (f.kind, f.size, f.media_key) == (Kind.LOCAL_ORIGINAL, 5, "abcdefgh")
    assert files["local_thumbnails/ab/cd/efgh/1-1-image-png-crop"].media_key == "abcdefgh"


def test_walk_of_missing_root_is_empty(tmp_path: Path) -> None:
    assert walk(str(tmp_path / "nothing")) == []


def test_prune_stops_at_top_folder_and_at_non_empty(tmp_path: Path) -> None:
    _touch(tmp_path, "remote_content/s.org/ab/cd/efgh")
    _touch(tmp_path, "remote_content/s.org/ab/xx/keep")
    (tmp_path / "remote_content/s.org/ab/cd/efgh").unlink()
    assert prune_empty_dirs(str(tmp_path), "remote_content/s.org/ab/cd/efgh") == 1
    assert not (tmp_path / "remote_content/s.org/ab/cd").exists()
    assert (tmp_path / "remote_content/s.org/ab/xx/keep").exists()
    (tmp_path / "remote_content/s.org/ab/xx/keep").unlink()
    assert prune_empty_dirs(str(tmp_path), "remote_content/s.org/ab/xx/keep") == 3
    assert (tmp_path / "remote_content").is_dir()
    assert os.listdir(tmp_path / "remote_content") == []


def test_prune_of_a_non_empty_folder_removes_nothing(tmp_path: Path) -> None:
    _touch(tmp_path, "local_content/ab/cd/one")
    assert prune_empty_dirs(str(tmp_path), "local_content/ab/cd/two") == 0
    assert (tmp_path / "local_content/ab/cd/one").exists()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0),
        ("90", 90),
        ("30s", 30),
        ("15m", 900),
        ("2h", 7200),
        ("1d", 86400),
        ("1.5d", 129600),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text, source="t", key="k") == seconds


@pytest.mark.parametrize("text", ["", "d", "1y", "-1d", "1 day", True])
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text, source="t", key="--min-age")
