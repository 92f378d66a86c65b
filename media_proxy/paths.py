"""Synapse's media store layout, as pure functions.

Every path the proxy reads, writes, evicts or asks S3 for is built here, from database
values only, and checked twice the way Synapse checks it: each joined component against a
small character set, then the normalized result against the store root ("jail check").
A relative path doubles as the S3 key (after the provider's prefix).
"""

from __future__ import annotations

import functools
import hashlib
import os
import posixpath
import re
import string
from typing import Final

# Synapse's set: ASCII letters and digits plus what domain names, IPv6 literals and ports
# need. No "/", "%", space or "+", so a component can never name another directory.
_ALLOWED: Final = frozenset(string.ascii_letters + string.digits + "_-.[]:")
_FORBIDDEN: Final = frozenset({"", ".", ".."})
# URL-preview ids ("2026-11-24_AbCd...") get a date-based folder of their own.
_URL_CACHE_DATED_ID: Final = re.compile(r"^\d\d\d\d-\d\d-\d\d")

# Where the proxy keeps its own state inside the cache root: outside every media folder,
# so neither Synapse nor `s3_media_upload` ever looks at it.
STATE_DIR: Final = ".media-proxy"
FILL_DIR: Final = f"{STATE_DIR}/fill"


class PathError(ValueError):
    """A database value that cannot form a safe store path."""


def component(name: str) -> str:
    """Return `name` if it is safe as one path component, else raise PathError."""
    if name in _FORBIDDEN or not _ALLOWED.issuperset(name):
        raise PathError(f"invalid path component: {name!r}")
    return name


def _join(*parts: str) -> str:
    """posixpath.join of checked components, or paths of them (never empty, never starting
    or ending with "/"): plain "/"s, at half the cost on every request and walked file."""
    return "/".join(parts)


def _sharded(file_id: str) -> str:
    return _join(component(file_id[0:2]), component(file_id[2:4]), component(file_id[4:]))


def _thumbnail_name(width: int, height: int, content_type: str, method: str) -> str:
    parts = content_type.split("/")
    if len(parts) != 2:
        raise PathError(f"invalid thumbnail type: {content_type!r}")
    return component(f"{int(width)}-{int(height)}-{parts[0]}-{parts[1]}-{method}")


def _checked(rel: str) -> str:
    """Second line of defence: the path must be normalized and relative, without a ".."
    (a normalized path keeps ".." only at its start) and not "." itself; joined to a
    normalized root it then names something strictly below it."""
    norm = posixpath.normpath(rel)
    if norm != rel or norm.startswith(("/", "../")) or norm in ("..", "."):
        raise PathError(f"path escapes the media store: {rel!r}")
    return rel


def local_media(media_id: str) -> str:
    return _checked(_join("local_content", _sharded(media_id)))


def local_thumbnail_dir(media_id: str) -> str:
    return _checked(_join("local_thumbnails", _sharded(media_id)))


def local_thumbnail(media_id: str, width: int, height: int, content_type: str, method: str) -> str:
    name = _thumbnail_name(width, height, content_type, method)
    return _checked(_join("local_thumbnails", _sharded(media_id), name))


def remote_media(server_name: str, filesystem_id: str) -> str:
    return _checked(_join("remote_content", component(server_name), _sharded(filesystem_id)))


def remote_thumbnail_dir(server_name: str, filesystem_id: str) -> str:
    return _checked(_join("remote_thumbnail", component(server_name), _sharded(filesystem_id)))


def remote_thumbnail(
    server_name: str, filesystem_id: str, width: int, height: int, content_type: str, method: str
) -> str:
    name = _thumbnail_name(width, height, content_type, method)
    return _checked(_join(remote_thumbnail_dir(server_name, filesystem_id), name))


def url_cache_media(media_id: str) -> str:
    if _URL_CACHE_DATED_ID.match(media_id):
        rel = _join("url_cache", component(media_id[:10]), component(media_id[11:]))
    else:
        rel = _join("url_cache", _sharded(media_id))
    return _checked(rel)


def in_store(root: str, rel: str) -> str:
    """The path of `rel` below `root` (normalized), jail-checked: `rel` must pass `_checked`,
    which keeps it strictly below any normalized root it is joined to. (Every hit asks this:
    a string join, not a normalization and a common-path search of the whole path.)"""
    return _root_prefix(root) + _checked(rel)


@functools.lru_cache(maxsize=16)
def _root_prefix(root: str) -> str:
    base = os.path.normpath(root)
    return base if base.endswith("/") else base + "/"


def fill_name(rel: str) -> str:
    """The fill file's name for a store path: fixed, so every process agrees on it."""
    return hashlib.sha256(rel.encode()).hexdigest()[:40]
