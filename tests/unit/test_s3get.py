"""The serving path's own SigV4 GET signs exactly as botocore does (botocore is the oracle:
same request, same instant, same Authorization), and is used only where it can."""

from __future__ import annotations

import datetime

import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials
import botocore.handlers
import botocore.parsers
import pytest
from hypothesis import given
from hypothesis import strategies as st

from media_proxy import s3get
from media_proxy.config import S3Config

NOW = 1_796_000_000.0  # 2026-11-30
KEY_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs",))


def botocore_authorization(
    host: str, bucket: str, key: str, region: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    monkeypatch.setattr(
        botocore.auth,
        "get_current_datetime",
        lambda: datetime.datetime.fromtimestamp(NOW, datetime.UTC).replace(tzinfo=None),
        raising=False,
    )
    request = botocore.awsrequest.AWSRequest(
        method="GET", url=f"https://{host}{s3get.object_path(bucket, key)}"
    )
    # as botocore signs a GET with payload signing off (our GETs send UNSIGNED-PAYLOAD)
    request.context["client_config"] = botocore.config.Config(s3={"payload_signing_enabled": False})
    creds = botocore.credentials.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY")
    botocore.auth.S3SigV4Auth(creds, "s3", region).add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize(
    ("host", "bucket", "key", "region"),
    [
        ("127.0.0.1:3900", "matrix", "local_content/ab/cd/efghijklmnopqrstuvwx", "garage"),
        ("s3.example.org", "media", "prefix/remote_content/example.org:8448/ab/cd/ef", "us-east-1"),
        ("localhost:8333", "b", "local_thumbnails/ab/cd/ef/96-96-image-png-crop", "eu-west-1"),
    ],
)
def test_signature_is_botocores(
    host: str, bucket: str, key: str, region: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = s3get.Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY", region)
    headers = ours.headers(host, s3get.object_path(bucket, key), now=NOW)
    assert headers["Authorization"] == botocore_authorization(
        host, bucket, key, region, monkeypatch
    )
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert headers["Host"] == host


@given(key=st.text(KEY_CHARS, min_size=1, max_size=60))
def test_any_key_is_signed_as_botocore_signs_it(key: str) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        ours = s3get.Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY", "garage")
        headers = ours.headers("h:1", s3get.object_path("bkt", key), now=NOW)
        assert headers["Authorization"] == botocore_authorization(
            "h:1", "bkt", key, "garage", monkeypatch
        )


def config(**changes: object) -> S3Config:
    base: dict[str, object] = {
        "bucket": "media",
        "endpoint_url": "http://127.0.0.1:3900",
        "access_key_id": "k",
        "secret_access_key": "s",
    }
    return S3Config(**{**base, **changes})  # type: ignore[arg-type]


def test_used_only_where_botocore_is_not_needed() -> None:
    assert s3get.usable(config())
    assert s3get.usable(config(endpoint_url="https://s3.example.org/"))
    assert not s3get.usable(config(endpoint_url=None))  # AWS's own endpoints: botocore's
    assert not s3get.usable(config(endpoint_url="http://h:1/base"))
    assert not s3get.usable(config(addressing_style="virtual"))
    assert not s3get.usable(config(session_token="t"))
    assert not s3get.usable(config(sse_customer_key="x" * 32))
    assert not s3get.usable(config(access_key_id=None))


@pytest.mark.parametrize(
    "params",
    [
        {"list-type": "2", "prefix": "local_content/ab/", "max-keys": "1000"},
        {
            "list-type": "2",
            "prefix": "p/remote_content/example.org:8448/",
            "max-keys": "1000",
            "encoding-type": "url",
            "continuation-token": "Ab+/=c d",
        },
    ],
)
def test_listing_signature_is_botocores(
    params: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    query = s3get.canonical_query(params)
    ours = s3get.Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY", "garage")
    headers = ours.headers("h:1", "/bkt", query, now=NOW)
    monkeypatch.setattr(
        botocore.auth,
        "get_current_datetime",
        lambda: datetime.datetime.fromtimestamp(NOW, datetime.UTC).replace(tzinfo=None),
        raising=False,
    )
    request = botocore.awsrequest.AWSRequest(method="GET", url="https://h:1/bkt", params=params)
    request.context["client_config"] = botocore.config.Config(s3={"payload_signing_enabled": False})
    creds = botocore.credentials.Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY")
    botocore.auth.S3SigV4Auth(creds, "s3", "garage").add_auth(request)
    assert headers["Authorization"] == request.headers["Authorization"]


LISTING = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>media</Name>
<Prefix>p%2F</Prefix><KeyCount>3</KeyCount><MaxKeys>3</MaxKeys><EncodingType>url</EncodingType>
<IsTruncated>true</IsTruncated>
<Contents><Key>p/local_content/ab/cd/efgh</Key><LastModified>2026-11-30T10:11:12.000Z</LastModified>
<ETag>&quot;x&quot;</ETag><Size>1024</Size><StorageClass>STANDARD</StorageClass></Contents>
<Contents><Key>p/remote_content/example.org%3A8448/ab/cd/ef</Key>
<LastModified>2026-11-30T10:11:13Z</LastModified><Size>0</Size></Contents>
<Contents><Key>p/odd+key%20%C3%A9</Key><LastModified>2026-11-30T10:11:14.5Z</LastModified>
<Size>7</Size></Contents>
<NextContinuationToken>tok/en+=</NextContinuationToken></ListBucketResult>"""


def test_listing_is_read_as_botocore_reads_it() -> None:
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3", region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s"
    )
    model = client.meta.service_model.operation_model("ListObjectsV2")
    parser = botocore.parsers.create_parser("rest-xml")
    parsed = parser.parse({"body": LISTING, "headers": {}, "status_code": 200}, model.output_shape)
    botocore.handlers.decode_list_object_v2(parsed, {"encoding_type_auto_set": True})
    page = s3get.parse_list_page(LISTING)
    assert page.objects == [
        (o["Key"], o["Size"], o["LastModified"].timestamp()) for o in parsed["Contents"]
    ]
    assert page.next_token == parsed["NextContinuationToken"] == "tok/en+="


def test_last_page_has_no_token() -> None:
    last = LISTING.replace(b"<IsTruncated>true", b"<IsTruncated>false")
    assert s3get.parse_list_page(last).next_token is None
