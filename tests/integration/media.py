"""Helpers shared by the serving-path tests: raw HTTP, uploads, eviction, direct SQL.

HTTP goes through http.client so that nothing normalizes what a server sent: the
differential tests compare raw status lines, header lists and bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from devstack import seaweed
from devstack.postgres import PostgresDatabase
from devstack.synapse import SqliteDatabase, Synapse
from media_proxy import config, paths

# Headers allowed to differ between Synapse and the proxy.
IGNORED = frozenset({"server", "date"})
RANGES_ADVERTISED = ("accept-ranges", "bytes")


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool = True  # False: the connection broke before Content-Length bytes came
    error: str = ""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[-1] if values else None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def comparable(self) -> tuple[int, list[tuple[str, str]], str, bool]:
        # "Accept-Ranges: bytes" is the one header the proxy adds on purpose (Range support,
        # config `ranges`); the Range tests check it where it belongs.
        headers = sorted(
            (k, v) for k, v in self.headers if k not in IGNORED and (k, v) != RANGES_ADVERTISED
        )
        if self.status == 204:
            # Twisted sends "Content-Length: 0" on a 204; aiohttp, following RFC 9110, does not.
            headers = [h for h in headers if h != ("content-length", "0")]
        return self.status, headers, self.sha256, self.complete


def request(
    base_url: str,
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    timeout: float = 60,
) -> Answer:
    url = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname or "127.0.0.1", url.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers or []:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        answer = Answer(resp.status, [(k.lower(), v) for k, v in resp.getheaders()], b"")
        try:
            answer.body = resp.read()
        except http.client.IncompleteRead as e:
            answer.body, answer.complete, answer.error = e.partial, False, repr(e)
        except (ConnectionError, OSError) as e:
            answer.complete, answer.error = False, repr(e)
        return answer
    finally:
        conn.close()


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


@dataclass
class Media:
    media_id: str
    data: bytes
    content_type: str
    name: str | None
    server_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rel(self) -> str:
        return paths.local_media(self.media_id)

    def client_path(self, suffix: str = "") -> str:
        return f"/_matrix/client/v1/media/download/{self.server_name}/{self.media_id}{suffix}"

    def legacy_path(self, version: str = "v3", suffix: str = "") -> str:
        return f"/_matrix/media/{version}/download/{self.server_name}/{self.media_id}{suffix}"


def upload(
    base_url: str,
    token: str,
    data: bytes,
    *,
    content_type: str = "application/octet-stream",
    name: str | None = None,
    server_name: str,
    headers: list[tuple[str, str]] | None = None,
) -> Media:
    query = f"?filename={urllib.parse.quote(name)}" if name else ""
    answer = request(
        base_url,
        f"/_matrix/media/v3/upload{query}",
        method="POST",
        headers=[*bearer(token), ("Content-Type", content_type), *(headers or [])],
        body=data,
    )
    assert answer.status == 200, (answer.status, answer.body[:300])
    media_id = json.loads(answer.body)["content_uri"].rsplit("/", 1)[1]
    return Media(media_id, data, content_type, name, server_name)


def store_file(synapse: Synapse, media: Media) -> Any:
    return synapse.media_store_path / media.rel


def stored_bytes(synapse: Synapse, media: Media, timeout: float = 10.0) -> bytes | None:
    """The store file's bytes once it is complete (None if it never is): a fill sends the
    verified body first and renames the file into place just after (fsync in between)."""
    return complete_file(store_file(synapse, media), len(media.data), timeout)


def folder_bytes(folder: Path, expected: list[bytes], timeout: float = 10.0) -> list[bytes]:
    """The contents of the files in `folder` once they are `expected` (or as they are when
    the time is up): fills rename their files into place just after answering."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(p.read_bytes() for p in folder.iterdir()) if folder.is_dir() else []
        if found == sorted(expected) or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def complete_file(path: Path, length: int, timeout: float = 10.0) -> bytes | None:
    """`path`'s bytes once it has `length` bytes, or None if it never gets there."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if path.stat().st_size == length:
                return path.read_bytes()
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def settle_fills(synapse: Synapse, timeout: float = 10.0) -> None:
    """Wait until no fill is running: a fill started by an earlier request (a HEAD, say) goes
    on after its answer and would put an evicted file back behind a test's back."""
    fill_dir = synapse.media_store_path / paths.FILL_DIR
    deadline = time.monotonic() + timeout
    while fill_dir.exists() and any(fill_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)


def evict(synapse: Synapse, media: Media) -> None:
    settle_fills(synapse)
    store_file(synapse, media).unlink(missing_ok=True)


def sql(synapse: Synapse, statement: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one statement on Synapse's database (`?` placeholders), return its rows."""
    db = synapse.database
    if isinstance(db, SqliteDatabase):
        with sqlite3.connect(db.path, timeout=10) as conn:
            return [tuple(r) for r in conn.execute(statement, args).fetchall()]
    assert isinstance(db, PostgresDatabase)
    numbered = statement
    for i in range(1, len(args) + 1):
        numbered = numbered.replace("?", f"${i}", 1)

    async def run() -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(db.dsn)
        try:
            return [tuple(r) for r in await conn.fetch(numbered, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


def proxy_s3_config(bucket: seaweed.S3Config, prefix: str) -> config.S3Config:
    """media-proxy's S3 settings for a devstack bucket, under a key prefix of the test's own."""
    return config.S3Config(
        bucket=bucket.bucket,
        prefix=prefix,
        endpoint_url=bucket.endpoint_url,
        region_name=bucket.region,
        access_key_id=bucket.access_key,
        secret_access_key=bucket.secret_key,
    )
