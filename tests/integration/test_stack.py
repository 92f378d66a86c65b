"""The dev stack itself, against real SeaweedFS, PostgreSQL and Synapse (both databases).

Proves what every other integration test relies on: an upload lands in Synapse's media store
and, through the S3 storage provider, in SeaweedFS with the same bytes; Synapse serves it back,
from S3 once the local file is gone. Also proves tests/faults.py against SeaweedFS.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from typing import Any

import botocore.exceptions
import pytest

from devstack import (
    PostgresDatabase,
    SeaweedFS,
    SqliteDatabase,
    Synapse,
    local_content_key,
    parse_mxc,
    s3_client,
)
from tests.faults import FaultProxy

pytestmark = pytest.mark.integration


def download(synapse: Synapse, server: str, media_id: str, token: str) -> tuple[int, bytes]:
    status, _, body = synapse.request(
        "GET", f"/_matrix/client/v1/media/download/{server}/{media_id}", token=token
    )
    return status, body


def s3_object(synapse: Synapse, seaweed: SeaweedFS, key: str) -> bytes:
    assert synapse.s3 is not None
    body: bytes = seaweed.client().get_object(Bucket=synapse.s3.bucket, Key=key)["Body"].read()
    return body


def test_synapse_runs_on_the_database_it_was_given(synapse: Synapse) -> None:
    db = synapse.config["database"]
    if isinstance(synapse.database, SqliteDatabase):
        assert db["name"] == "sqlite3"
        assert synapse.database.path.is_file()
    else:
        assert isinstance(synapse.database, PostgresDatabase)
        assert db["name"] == "psycopg2"
        assert db["args"]["port"] == synapse.database.port
    status, _, _ = synapse.request("GET", "/_matrix/client/versions")
    assert status == 200


def test_upload_lands_in_store_and_s3_and_is_served_back(
    synapse: Synapse, seaweed: SeaweedFS, user_token: str
) -> None:
    data = os.urandom(300_000)
    server, media_id = parse_mxc(synapse.upload(user_token, data, filename="x.bin"))
    assert server == synapse.server_name
    assert len(media_id) == 24

    stored = synapse.local_media_path(media_id)
    assert (
        stored
        == synapse.media_store_path / "local_content" / media_id[:2] / media_id[2:4] / media_id[4:]
    )
    assert stored.read_bytes() == data
    assert s3_object(synapse, seaweed, local_content_key(media_id)) == data

    assert download(synapse, server, media_id, user_token) == (200, data)


def test_synapse_serves_from_s3_when_the_local_file_is_gone(
    synapse: Synapse, seaweed: SeaweedFS, user_token: str
) -> None:
    data = os.urandom(70_000)
    server, media_id = parse_mxc(synapse.upload(user_token, data, filename="evicted.bin"))
    synapse.local_media_path(media_id).unlink()

    assert download(synapse, server, media_id, user_token) == (200, data)
    # The S3 provider streams to the client without writing the file back.
    assert not synapse.local_media_path(media_id).exists()

    # Gone from S3 too: nothing left to serve.
    assert synapse.s3 is not None
    seaweed.client().delete_object(Bucket=synapse.s3.bucket, Key=local_content_key(media_id))
    status, body = download(synapse, server, media_id, user_token)
    assert status == 404, body


def test_login_and_admin_tokens_work(synapse: Synapse, admin_token: str) -> None:
    token = synapse.login("alice", "devstack-password")
    status, _, body = synapse.request("GET", "/_matrix/client/v3/account/whoami", token=token)
    assert status == 200 and synapse.user_id("alice").encode() in body
    status, _, _ = synapse.request(
        "GET", f"/_synapse/admin/v2/users/{synapse.user_id('alice')}", token=admin_token
    )
    assert status == 200
    status, _, _ = synapse.request(
        "GET", f"/_synapse/admin/v2/users/{synapse.user_id('alice')}", token=token
    )
    assert status == 403


# --- tests/faults.py ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedFS) -> str:
    return seaweed.create_bucket("faults").bucket


def via(proxy: FaultProxy, seaweed: SeaweedFS) -> Any:
    """A botocore client that reaches SeaweedFS through the proxy, without retries."""
    return s3_client(proxy.url, seaweed.access_key, seaweed.secret_key, max_attempts=1)


def test_fault_proxy_counts_requests_over_keep_alive(
    seaweed: SeaweedFS, bucket: str, s3_faults: FaultProxy
) -> None:
    client = via(s3_faults, seaweed)
    big = os.urandom(3 * 1024 * 1024 + 17)  # a body far larger than one read
    client.put_object(Bucket=bucket, Key="dir/big", Body=big)
    client.put_object(Bucket=bucket, Key="dir/small", Body=b"GET / HTTP/1.1\r\n\r\n")
    for _ in range(3):
        assert client.get_object(Bucket=bucket, Key="dir/big")["Body"].read() == big
    assert client.get_object(Bucket=bucket, Key="dir/small")["Body"].read().startswith(b"GET")

    assert s3_faults.requests == [
        ("PUT", f"/{bucket}/dir/big"),
        ("PUT", f"/{bucket}/dir/small"),
        *[("GET", f"/{bucket}/dir/big")] * 3,
        ("GET", f"/{bucket}/dir/small"),
    ]
    assert s3_faults.count("GET") == 4
    assert s3_faults.count("GET", f"/{bucket}/dir/big") == 3
    assert s3_faults.connections == 1  # all six on one keep-alive connection
    s3_faults.reset()
    assert s3_faults.requests == [] and s3_faults.count() == 0


def test_fault_proxy_counts_chunked_uploads(
    seaweed: SeaweedFS, bucket: str, s3_faults: FaultProxy
) -> None:
    conn = http.client.HTTPConnection(s3_faults.host, s3_faults.port, timeout=10)
    body = b"5\r\nGET /\r\n3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    conn.request("PUT", "/nowhere/x", body=body, headers={"Transfer-Encoding": "chunked"})
    conn.getresponse().read()  # SeaweedFS refuses it (no signature); only the framing matters
    conn.request("HEAD", "/nowhere/y")
    conn.getresponse().read()
    conn.close()
    assert s3_faults.requests == [("PUT", "/nowhere/x"), ("HEAD", "/nowhere/y")]


def test_fault_proxy_cuts_matching_responses_short(
    seaweed: SeaweedFS, bucket: str, s3_faults: FaultProxy
) -> None:
    client = via(s3_faults, seaweed)
    data = os.urandom(2 * 1024 * 1024)
    client.put_object(Bucket=bucket, Key="cut/a", Body=data)
    client.put_object(Bucket=bucket, Key="cut/b", Body=data)
    s3_faults.cut_after(
        64 * 1024, match=lambda method, path: method == "GET" and path.endswith("/cut/a"), times=1
    )

    assert client.get_object(Bucket=bucket, Key="cut/b")["Body"].read() == data  # no match
    with pytest.raises(
        (
            botocore.exceptions.IncompleteReadError,
            botocore.exceptions.ReadTimeoutError,
            botocore.exceptions.ResponseStreamingError,
        )
    ):
        client.get_object(Bucket=bucket, Key="cut/a")["Body"].read()
    # times=1: the next one is whole again.
    assert client.get_object(Bucket=bucket, Key="cut/a")["Body"].read() == data

    # Raw view: the client gets the head and part of the body, then the connection closes.
    s3_faults.cut_after(100)
    conn = http.client.HTTPConnection(s3_faults.host, s3_faults.port, timeout=10)
    conn.request("GET", "/")
    with pytest.raises((http.client.RemoteDisconnected, http.client.IncompleteRead)):
        conn.getresponse().read()
    conn.close()


def test_fault_proxy_latency_and_down(
    seaweed: SeaweedFS, bucket: str, s3_faults: FaultProxy
) -> None:
    client = via(s3_faults, seaweed)
    client.put_object(Bucket=bucket, Key="slow", Body=b"x")
    s3_faults.set_latency(0.4, match=lambda method, path: method == "GET")
    started = time.monotonic()
    client.head_object(Bucket=bucket, Key="slow")
    assert time.monotonic() - started < 0.3
    started = time.monotonic()
    assert client.get_object(Bucket=bucket, Key="slow")["Body"].read() == b"x"
    assert time.monotonic() - started >= 0.4

    s3_faults.set_down(True)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((s3_faults.host, s3_faults.port), timeout=2).close()
    with pytest.raises(botocore.exceptions.EndpointConnectionError):
        client.get_object(Bucket=bucket, Key="slow")
    s3_faults.set_down(False)
    assert client.get_object(Bucket=bucket, Key="slow")["Body"].read() == b"x"
