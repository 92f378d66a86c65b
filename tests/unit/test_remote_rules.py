"""Remote media: Synapse's refusals in its order (pipeline/rules.py), the config keys they
read, and the remote rows and batched access times of metadata.py on a real SQLite file."""

from __future__ import annotations

import sqlite3
import textwrap
from pathlib import Path

import pytest

from media_proxy.config import Config, ConfigError, load
from media_proxy.metadata import Metadata, RemoteMedia, SqliteDatabase
from media_proxy.parse import Api, MediaRequest, parse
from media_proxy.pipeline import rules
from media_proxy.pipeline.rules import NOT_FOUND, Refusal

ORIGIN = "remote.example:8448"
CLIENT = f"/_matrix/client/v1/media/download/{ORIGIN}/abcdefgh"
LEGACY = f"/_matrix/media/v3/download/{ORIGIN}/abcdefgh"
THUMB = f"/_matrix/client/v1/media/thumbnail/{ORIGIN}/abcdefgh?width=1&height=1"
LEGACY_THUMB = f"/_matrix/media/r0/thumbnail/{ORIGIN}/abcdefgh?width=1&height=1"


def req(target: str) -> MediaRequest:
    media = parse("GET", target)
    assert media is not None
    return media


def denied() -> Refusal:
    return Refusal(403, "M_FORBIDDEN", f"Federation denied with {ORIGIN}.")


def path_404(target: str) -> Refusal:
    return Refusal(404, "M_NOT_FOUND", f"Not found '{target.split('?')[0]}'")


OUTSIDE = ["other.example"]  # a whitelist without ORIGIN


@pytest.mark.parametrize(
    ("target", "whitelist", "prevented", "expected"),
    [
        (CLIENT, None, [], None),
        (CLIENT, [ORIGIN], [], None),
        (CLIENT, [], [], denied()),  # an empty whitelist refuses everyone
        (CLIENT, ["REMOTE.example:8448"], [], denied()),  # exact, case-sensitive
        (CLIENT, ["remote.example"], [], denied()),  # the port is part of the name
        (CLIENT, None, [ORIGIN], path_404(CLIENT)),
        # downloads: the whitelist first, then the prevent list
        (CLIENT, OUTSIDE, [ORIGIN], denied()),
        # legacy downloads: allow_remote=false before both
        (LEGACY + "?allow_remote=false", OUTSIDE, [ORIGIN], path_404(LEGACY)),
        (LEGACY + "?allow_remote=true", None, [], None),
        (LEGACY + "?allow_remote=false&allow_remote=true", None, [], path_404(LEGACY)),
        (LEGACY + "?allow_remote=true&allow_remote=false", None, [], None),  # first wins
        (CLIENT + "?allow_remote=false", None, [], None),  # only the legacy route reads it
        # thumbnails: the prevent list (in the servlet) before the whitelist
        (THUMB, OUTSIDE, [ORIGIN], path_404(THUMB)),
        (THUMB, OUTSIDE, [], denied()),
        (LEGACY_THUMB + "&allow_remote=false", None, [], None),  # no allow_remote here
        (LEGACY_THUMB, None, [ORIGIN], path_404(LEGACY_THUMB)),
    ],
)
def test_origin_refusal_in_synapses_order(
    target: str, whitelist: list[str] | None, prevented: list[str], expected: Refusal | None
) -> None:
    got = rules.origin_refusal(req(target), whitelist=whitelist, prevented=prevented)
    assert got == expected


@pytest.mark.parametrize(
    ("target", "unsure"),
    [
        (LEGACY + "?allow_remote=maybe", True),  # Synapse's own 400
        (LEGACY + "?allow_remote=", True),
        (LEGACY + "?allow_remote=True", True),
        (LEGACY + "?allow_remote=true", False),
        (LEGACY, False),
        (CLIENT + "?allow_remote=maybe", False),
        (LEGACY_THUMB + "&allow_remote=maybe", False),
    ],
)
def test_allow_remote_values_synapse_refuses_are_passed_on(target: str, unsure: bool) -> None:
    assert rules.allow_remote_unsure(req(target)) is unsure


def row(*, quarantined: bool = False, authenticated: bool = False) -> RemoteMedia:
    return RemoteMedia(
        origin=ORIGIN,
        media_id="abcdefgh",
        media_type="image/png",
        media_length=10,
        upload_name=None,
        filesystem_id="ABCDEFGHIJKLMNOPQRSTUVWX",
        quarantined_by="@admin:example.org" if quarantined else None,
        authenticated=authenticated,
        sha256=None,
    )


@pytest.mark.parametrize(
    ("api", "auth_media", "quarantined", "authenticated", "expected"),
    [
        (Api.CLIENT, True, False, True, None),  # the client API serves authenticated rows
        (Api.LEGACY, True, False, True, NOT_FOUND),
        (Api.LEGACY, False, False, True, None),  # the flag counts only while the option is on
        (Api.LEGACY, True, False, False, None),
        (Api.CLIENT, True, True, False, NOT_FOUND),  # quarantine: "Not found", no path
        (Api.LEGACY, False, True, True, NOT_FOUND),
    ],
)
def test_remote_row_refusal(
    api: Api, auth_media: bool, quarantined: bool, authenticated: bool, expected: Refusal | None
) -> None:
    got = rules.remote_row_refusal(
        row(quarantined=quarantined, authenticated=authenticated),
        api,
        enable_authenticated_media=auth_media,
    )
    assert got == expected


def test_refusal_bodies_are_synapses_canonical_json() -> None:
    assert NOT_FOUND.body() == b'{"errcode":"M_NOT_FOUND","error":"Not found"}'
    assert denied().body() == (
        b'{"errcode":"M_FORBIDDEN","error":"Federation denied with remote.example:8448."}'
    )


# --- config ---------------------------------------------------------------------------------


def load_hs(tmp_path: Path, text: str) -> Config:
    hs = tmp_path / "homeserver.yaml"
    hs.write_text("server_name: example.org\n" + textwrap.dedent(text))
    return load(synapse_config=[hs], overrides={"synapse_url": "http://127.0.0.1:8008"}, environ={})


def test_origin_lists_from_homeserver_yaml(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        """
        federation_domain_whitelist: [a.example, "b.example:8448"]
        prevent_media_downloads_from: [c.example]
        """,
    )
    assert config.federation_domain_whitelist == ("a.example", "b.example:8448")
    assert config.prevent_media_downloads_from == ("c.example",)


def test_origin_lists_default_to_federating_with_everyone(tmp_path: Path) -> None:
    config = load_hs(tmp_path, "prevent_media_downloads_from: null\n")
    assert config.federation_domain_whitelist is None
    assert config.prevent_media_downloads_from == ()
    empty = load_hs(tmp_path, "federation_domain_whitelist: []\n")
    assert empty.federation_domain_whitelist == ()


@pytest.mark.parametrize("key", ["federation_domain_whitelist", "prevent_media_downloads_from"])
def test_origin_list_errors_name_the_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_hs(tmp_path, f"{key}: a.example\n")
    assert key in str(info.value)


# --- metadata --------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE remote_media_cache (
    media_origin TEXT, media_id TEXT, media_type TEXT, created_ts BIGINT, upload_name TEXT,
    media_length INTEGER, filesystem_id TEXT, last_access_ts BIGINT, quarantined_by TEXT,
    authenticated BOOLEAN NOT NULL DEFAULT FALSE, sha256 TEXT,
    UNIQUE (media_origin, media_id)
);
CREATE TABLE remote_media_cache_thumbnails (
    media_origin TEXT, media_id TEXT, thumbnail_width INTEGER, thumbnail_height INTEGER,
    thumbnail_method TEXT, thumbnail_type TEXT, thumbnail_length INTEGER, filesystem_id TEXT
);
INSERT INTO remote_media_cache VALUES
    ('b.example:8448', 'm1', 'image/png', 1, 'x.png', 10, 'FSIDFSIDFSID', NULL, NULL, 1, 'ab'),
    ('b.example:8448', 'm2', NULL, 1, NULL, 20, 'OTHEROTHEROT', 5, '@a:x', 0, NULL),
    ('c.example', 'm1', 'text/plain', 1, NULL, 30, 'THIRDTHIRDTH', NULL, NULL, 0, NULL);
INSERT INTO remote_media_cache_thumbnails VALUES
    ('b.example:8448', 'm1', 32, 32, 'crop', 'image/png', 99, 'FSIDFSIDFSID'),
    ('c.example', 'm1', 64, 64, 'crop', 'image/png', 98, 'THIRDTHIRDTH');
"""


@pytest.fixture
async def metadata(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "homeserver.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA)
    meta = Metadata(await SqliteDatabase.open(str(path)), ttl=60, maxsize=100, flush_interval=3600)
    await meta.start()
    yield meta, path
    await meta.close()


async def test_remote_rows_by_origin_and_media_id(metadata) -> None:  # type: ignore[no-untyped-def]
    meta, _ = metadata
    first = await meta.remote_media("b.example:8448", "m1")
    assert first == RemoteMedia(
        "b.example:8448", "m1", "image/png", 10, "x.png", "FSIDFSIDFSID", None, True, "ab"
    )
    second = await meta.remote_media("b.example:8448", "m2")
    assert second.quarantined_by == "@a:x" and second.authenticated is False
    assert await meta.remote_media("b.example", "m1") is None  # the port is part of the key
    thumbs = await meta.remote_thumbnails("c.example", "m1")
    assert [(t.width, t.length, t.server_name) for t in thumbs] == [(64, 98, "c.example")]


async def test_remote_access_times_are_written_in_one_batch(metadata) -> None:  # type: ignore[no-untyped-def]
    meta, path = metadata
    meta.mark_remote_accessed("b.example:8448", "m1")
    meta.mark_remote_accessed("b.example:8448", "m1")
    meta.mark_remote_accessed("c.example", "m1")
    with sqlite3.connect(path) as conn:
        before = conn.execute("SELECT last_access_ts FROM remote_media_cache").fetchall()
    assert [r[0] for r in before] == [None, 5, None]  # nothing until the flush
    await meta.flush()
    with sqlite3.connect(path) as conn:
        after = dict(
            conn.execute(
                "SELECT media_origin || '/' || media_id, last_access_ts FROM remote_media_cache"
            ).fetchall()
        )
    assert after["b.example:8448/m1"] > 1_000_000_000_000
    assert after["c.example/m1"] == after["b.example:8448/m1"]
    assert after["b.example:8448/m2"] == 5  # not served: untouched
