"""The serving path's own SigV4 GET signs exactly as botocore does (botocore is the oracle:
same request, same instant, same Authorization), and is used only where it can."""

from __future__ import annotations

import datetime
import urllib.parse

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
    host: str,
    bucket: str,
    key: str,
    region: str,
    monkeypatch: pytest.MonkeyPatch,
    method: str = "GET",
) -> str:
    monkeypatch.setattr(
        botocore.auth,
        "get_current_datetime",
        lambda: datetime.datetime.fromtimestamp(NOW, datetime.UTC).replace(tzinfo=None),
        raising=False,
    )
    request = botocore.awsrequest.AWSRequest(
        method=method, url=f"https://{host}{s3get.object_path(bucket, key)}"
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


def test_head_signature_is_botocores(monkeypatch: pytest.MonkeyPatch) -> None:
    key = "local_content/ab/cd/efghijklmnopqrstuvwx"
    ours = s3get.Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCY", "garage")
    path = s3get.object_path("matrix", key)
    head = ours.headers("127.0.0.1:3900", path, now=NOW, method="HEAD")
    assert head["Authorization"] == botocore_authorization(
        "127.0.0.1:3900", "matrix", key, "garage", monkeypatch, method="HEAD"
    )
    assert head != ours.headers("127.0.0.1:3900", path, now=NOW)  # the method is signed


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
    assert not s3get.usable(config(endpoint_url="http://:9000"))
    assert not s3get.usable(config(endpoint_url="http://user:pw@h:9000"))
    assert s3get.usable(config(endpoint_url="http://[::1]:9000"))
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


XML_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cn"))


def _xml_text(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


@st.composite
def listing_pages(draw: st.DrawFn) -> tuple[bytes, bool]:
    """ListObjectsV2 pages as servers write them, and in shapes they could: URL-encoded or
    XML-escaped keys, fields in any order, extra fields, whitespace between elements, the
    request's token echoed, a page that ends or goes on."""
    space = draw(st.sampled_from(["", "\n", "\n  "]))
    entries = []
    plain = True  # every key URL-encoded, as asked: the shape read without a full parse
    for _ in range(draw(st.integers(0, 6))):
        encoded = draw(st.booleans())
        # Raw keys only where XML 1.0 can carry them (why clients ask for URL-encoded ones).
        chars = KEY_CHARS if encoded else XML_CHARS
        key = draw(st.text(chars, min_size=1, max_size=30))
        key_xml = urllib.parse.quote_plus(key, safe="/") if encoded else _xml_text(key)
        plain = plain and "&" not in key_xml
        stamp = draw(st.sampled_from(["2026-11-30T10:11:12.000Z", "2026-11-30T10:11:13Z"]))
        fields = [
            f"<Key>{key_xml}</Key>",
            f"<LastModified>{stamp}</LastModified>",
            f"<Size>{draw(st.integers(0, 10**12))}</Size>",
        ]
        fields += draw(
            st.lists(
                st.sampled_from(
                    [
                        "<ETag>&quot;9b2cf535f27731c974343645a3985328&quot;</ETag>",
                        "<StorageClass>STANDARD</StorageClass>",
                        "<Owner><ID>x</ID><DisplayName>y</DisplayName></Owner>",
                    ]
                ),
                unique=True,
            )
        )
        order = draw(st.permutations(fields))
        entries.append("<Contents>" + space.join(order) + "</Contents>")
    head = [
        "<Name>media</Name>",
        f"<IsTruncated>{draw(st.sampled_from(['true', 'false']))}</IsTruncated>",
    ]
    if draw(st.booleans()):
        head.append("<ContinuationToken>earlier+/=</ContinuationToken>")
    if draw(st.booleans()):
        head.append("<NextContinuationToken>tok/en+=</NextContinuationToken>")
    parts = [*head, *entries] if draw(st.booleans()) else [*entries, *head]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        + space.join(parts)
        + "</ListBucketResult>"
    )
    return body.encode(), plain


@given(drawn=listing_pages())
def test_a_listing_page_is_read_as_a_full_xml_parse_reads_it(drawn: tuple[bytes, bool]) -> None:
    page, plain = drawn
    assert s3get.parse_list_page(page) == s3get.parse_list_page_tree(page)
    if plain:  # read without the full parse
        assert s3get.parse_plain_list_page(page) == s3get.parse_list_page_tree(page)
