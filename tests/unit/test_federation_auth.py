"""X-Matrix parsing and checking, against Synapse's own functions where they can be called
alone (`_parse_auth_header`, `MatrixFederationHttpClient.build_auth_headers`), and against
the verified facts of the reference (error table, key rules) where they cannot."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import signedjson.key
from unpaddedbase64 import encode_base64

from media_proxy import federation_auth as fa
from media_proxy.federation_auth import KeyRow, Refusal, XMatrix
from media_proxy.parse import Api, Kind, parse
from media_proxy.pipeline import federation
from media_proxy.pipeline.federation import framing, success_headers
from media_proxy.pipeline.steps import PassThrough
from tests.unit.synapse_oracle import run_synapse

HEADERS = [
    'X-Matrix origin="remote.org",key="ed25519:abc",sig="c2ln",destination="local.org"',
    'X-Matrix  Origin=remote.org , KEY="ed25519:abc"\t,\tsig="c2ln"',
    'X-Matrix origin="re\\mote.org",key="ed25519:abc",sig="c2ln"',
    'X-Matrix origin=remote.org,key=ed25519:abc,sig="c2ln',
    'X-Matrix origin=remote.org,key=ed25519:abc,sig=c2ln"',
    'X-Matrix origin=remote.org,key=ed25519:abc,sig=c2ln,destination=""',
    'X-Matrix origin="[::1]:8448",key=ed25519:abc,sig=c2ln',
    "X-Matrix origin=remote.org,key=k,sig=s,origin=other.org,unknown=1",
    'X-Matrix origin=remote.org,key="a\\"b",sig=s',
    "X-Matrix origin=remote.org,key=,sig=",
    # malformed
    'X-Matrix origin="bad_name",key=k,sig=s',
    "X-Matrix origin = remote.org,key=k,sig=s",
    "X-Matrix origin=remote.org,key=k,sig=s,",
    "X-Matrix origin=remote.org,key=k",
    "X-Matrix\torigin=remote.org,key=k,sig=s",
    "X-Matrixorigin=remote.org,key=k,sig=s",
    "X-Matrix",
    "X-Matrix origin=remote.org:port,key=k,sig=s",
    "X-Matrix origin=,key=k,sig=s",
]

_PARSE_SCRIPT = """
import json, sys
from synapse.federation.transport.server._base import _parse_auth_header
out = []
for value in json.load(sys.stdin):
    try:
        out.append(list(_parse_auth_header(value.encode())))
    except Exception as e:
        out.append(type(e).__name__)
print(json.dumps(out))
"""


def _ours(value: str) -> Any:
    try:
        return list(fa.parse_header(value))
    except fa.Malformed:
        return "AuthenticationError"


def test_header_parsing_matches_synapse() -> None:
    expected = run_synapse(_PARSE_SCRIPT, HEADERS)
    assert [_ours(v) for v in HEADERS] == expected
    assert "AuthenticationError" in expected and expected[0] != "AuthenticationError"


_SIGN_SCRIPT = """
import json, sys
from types import SimpleNamespace
import signedjson.key
from unpaddedbase64 import encode_base64
from synapse.http.matrixfederationclient import MatrixFederationHttpClient
args = json.load(sys.stdin)
key = signedjson.key.generate_signing_key("v1")
me = SimpleNamespace(server_name=args["origin"], signing_key=key)
headers = MatrixFederationHttpClient.build_auth_headers(
    me, args["destination"].encode(), args["method"].encode(), args["uri"].encode()
)
print(json.dumps({
    "headers": [h.decode() for h in headers],
    "key": encode_base64(signedjson.key.get_verify_key(key).encode()),
}))
"""

URI = "/_matrix/federation/v1/media/download/AbCdEf?timeout_ms=20000"


@pytest.fixture(scope="module")
def signed_by_synapse() -> dict[str, Any]:
    """Headers Synapse builds as a sending server, and the verify key."""
    args = {"origin": "remote.org", "destination": "local.org", "method": "GET", "uri": URI}
    result: dict[str, Any] = run_synapse(_SIGN_SCRIPT, args)
    return result


def _key_rows(b64: str, *, valid_until: int = 2**62) -> list[KeyRow]:
    key_json = json.dumps({"verify_keys": {"ed25519:v1": {"key": b64}}}).encode()
    return [KeyRow(key_json, 1, valid_until)]


def test_synapse_signed_request_verifies(signed_by_synapse: dict[str, Any]) -> None:
    checked = fa.authenticate(signed_by_synapse["headers"], "local.org", None)
    assert isinstance(checked, XMatrix)
    assert checked.origin == "remote.org" and checked.key_ids == ["ed25519:v1"]
    key = fa.usable_key(_key_rows(signed_by_synapse["key"]), "ed25519:v1", 1000)
    assert key is not None
    keys = {"ed25519:v1": key}
    assert fa.verify(checked, "GET", URI, "local.org", keys)
    # Nothing is normalised: another method, an escaped letter, a dropped query all fail.
    assert not fa.verify(checked, "HEAD", URI, "local.org", keys)
    assert not fa.verify(checked, "GET", URI.replace("AbC", "Ab%43"), "local.org", keys)
    assert not fa.verify(checked, "GET", URI.split("?")[0], "local.org", keys)
    assert not fa.verify(checked, "GET", URI, "other.org", keys)
    other = signedjson.key.get_verify_key(signedjson.key.generate_signing_key("v1"))
    assert not fa.verify(checked, "GET", URI, "local.org", {"ed25519:v1": other})


def test_every_signature_of_the_origin_must_verify(signed_by_synapse: dict[str, Any]) -> None:
    good = signed_by_synapse["headers"][0]
    key = fa.usable_key(_key_rows(signed_by_synapse["key"]), "ed25519:v1", 1000)
    assert key is not None
    bogus_key = signedjson.key.get_verify_key(signedjson.key.generate_signing_key("v2"))
    bad = 'X-Matrix origin="remote.org",key="ed25519:v2",sig="c2ln"'
    checked = fa.authenticate([good, bad], "local.org", None)
    assert isinstance(checked, XMatrix) and checked.key_ids == ["ed25519:v1", "ed25519:v2"]
    keys = {"ed25519:v1": key, "ed25519:v2": bogus_key}
    assert not fa.verify(checked, "GET", URI, "local.org", keys)
    # A header of another origin before the good one is ignored (last origin wins).
    stranger = 'X-Matrix origin="evil.org",key="ed25519:x",sig="c2ln"'
    checked = fa.authenticate([stranger, good], "local.org", None)
    assert isinstance(checked, XMatrix) and checked.origin == "remote.org"
    assert fa.verify(checked, "GET", URI, "local.org", {"ed25519:v1": key})


GOOD = 'X-Matrix origin="remote.org",key="ed25519:abc",sig="c2ln"'


@pytest.mark.parametrize(
    ("headers", "whitelist", "expected"),
    [
        ([], None, Refusal(401, "M_UNAUTHORIZED", "Missing Authorization headers")),
        (["Bearer x"], None, Refusal(401, "M_UNAUTHORIZED", "Missing Authorization headers")),
        (
            ["x-matrix origin=a"],
            None,
            Refusal(401, "M_UNAUTHORIZED", "Missing Authorization headers"),
        ),
        (["Bearer x"], ["remote.org"], Refusal(403, "M_FORBIDDEN", "Federation denied with None.")),
        (
            ["X-Matrix origin=bad_name,key=k,sig=s"],
            None,
            Refusal(400, "M_UNAUTHORIZED", "Malformed Authorization header"),
        ),
        (
            [GOOD + ",destination=other.org"],
            None,
            Refusal(
                401, "M_UNAUTHORIZED", "Destination mismatch in auth header, received: 'other.org'"
            ),
        ),
        (
            [GOOD + ',destination=""'],
            None,
            Refusal(401, "M_UNAUTHORIZED", "Destination mismatch in auth header, received: ''"),
        ),
        ([GOOD], ["other.org"], Refusal(403, "M_FORBIDDEN", "Federation denied with remote.org.")),
        ([GOOD], [], Refusal(403, "M_FORBIDDEN", "Federation denied with remote.org.")),
        (
            ['X-Matrix origin=remote.org,key="rsa:1",sig=s'],
            None,
            Refusal(400, "M_UNAUTHORIZED", "Not signed by remote.org"),
        ),
        (
            ["X-Matrix origin=remote.org,key=,sig=s"],
            None,
            Refusal(400, "M_UNAUTHORIZED", "Not signed by remote.org"),
        ),
        # the first bad header decides, in order
        (
            [GOOD + ",destination=x.org", "X-Matrix"],
            None,
            Refusal(
                401, "M_UNAUTHORIZED", "Destination mismatch in auth header, received: 'x.org'"
            ),
        ),
        (
            ["X-Matrix", GOOD + ",destination=x.org"],
            None,
            Refusal(400, "M_UNAUTHORIZED", "Malformed Authorization header"),
        ),
        # non-ASCII: left to Synapse
        (['X-Matrix origin="remote.org",key="ed25519:abc",sig="c2l\u00e9"'], None, None),
    ],
)
def test_refusals_before_any_key(
    headers: list[str], whitelist: list[str] | None, expected: Refusal | None
) -> None:
    assert fa.authenticate(headers, "local.org", whitelist) == expected


def test_accepted_origin_and_destination() -> None:
    checked = fa.authenticate([GOOD + ",destination=local.org"], "local.org", ["remote.org"])
    assert checked == XMatrix("remote.org", {"remote.org": {"ed25519:abc": "c2ln"}})


def test_refusal_body_is_canonical_json() -> None:
    body = Refusal(400, "M_UNAUTHORIZED", "Malformed Authorization header").body()
    assert body == b'{"errcode":"M_UNAUTHORIZED","error":"Malformed Authorization header"}'


KEY = signedjson.key.get_verify_key(signedjson.key.generate_signing_key("v1"))
B64 = encode_base64(KEY.encode())


def _row(added: int, valid: int | None, b64: str = B64, where: str = "verify_keys") -> KeyRow:
    if where == "verify_keys":
        doc: dict[str, Any] = {"verify_keys": {"ed25519:v1": {"key": b64}}}
    else:
        doc = {"verify_keys": {}, "old_verify_keys": {"ed25519:v1": {"key": b64}}}
    return KeyRow(json.dumps(doc).encode(), added, valid)


NOW = 1_000_000_000
MARGIN = fa.VALIDITY_MARGIN_MS


@pytest.mark.parametrize(
    ("rows", "usable"),
    [
        ([], False),
        ([_row(1, NOW + MARGIN)], True),  # valid until exactly now (and our margin)
        ([_row(1, NOW + MARGIN - 1)], False),
        ([_row(1, None)], False),  # NULL counts as 0
        ([_row(1, NOW + 10**9), _row(2, NOW - 1)], False),  # the newest row decides
        ([_row(2, NOW + 10**9), _row(1, NOW - 1)], True),
        ([_row(1, NOW + 10**9, where="old")], False),  # Synapse raises KeyError: its 500
        ([_row(1, NOW + 10**9, b64="not base64!")], False),
        ([_row(2, NOW + 10**9), _row(2, NOW - 1)], False),  # a tie the database would break
        ([_row(2, NOW + 10**9), _row(2, NOW + 10**9)], True),
        ([_row(1, NOW + 10**9, b64="l/O9hxMVKB6Lg+3Hqf0FQQZhVESQcMzbPN1Cz2nM3og")], False),
    ],
)
def test_usable_key(rows: list[KeyRow], usable: bool) -> None:
    key = fa.usable_key(rows, "ed25519:v1", NOW)
    assert (key is not None) is usable
    if usable:
        assert key is not None and key.encode() == KEY.encode()


def test_federation_routes_parse() -> None:
    media = parse("GET", "/_matrix/federation/v1/media/download/AbC%44?timeout_ms=5")
    assert media is not None and media.api is Api.FEDERATION and media.kind is Kind.DOWNLOAD
    assert media.media_id == "AbCD" and media.server_name == ""
    media = parse("HEAD", "/_matrix/federation/v1/media/thumbnail/x?width=1&height=2")
    assert media is not None and media.kind is Kind.THUMBNAIL
    assert parse("GET", "/_matrix/federation/v1/media/thumbnail/x?width=1") is None
    assert parse("GET", "/_matrix/federation/v1/media/download/x?timeout_ms=-1") is None
    assert parse("PUT", "/_matrix/federation/v1/media/download/x") is None


_MULTIPART_SCRIPT = """
import json, sys
from synapse.media.media_storage import MultipartFileConsumer
class Sink:
    def __init__(self): self.data = b""
    def write(self, b): self.data += b
    def registerProducer(self, *a): pass
    def unregisterProducer(self): pass
out = []
for media_type, disposition, data in json.load(sys.stdin):
    sink = Sink()
    c = MultipartFileConsumer(None, sink, media_type, {}, disposition, len(data))
    c.write(data.encode())
    c.unregisterProducer()
    out.append([c.boundary.decode(), sink.data.decode(), c.content_length()])
print(json.dumps(out))
"""


def test_multipart_framing_matches_synapse() -> None:
    cases = [
        ["image/png", "inline; filename=cat.png", "PNGDATA"],
        ['image/svg+xml; x="y"', "attachment; filename*=utf-8''a%20b", "<svg/>"],
        ["application/octet-stream", "attachment", "x" * 100],
    ]
    for (media_type, disposition, data), (boundary, body, length) in zip(
        cases, run_synapse(_MULTIPART_SCRIPT, cases), strict=True
    ):
        head, tail = framing(boundary, media_type, disposition)
        assert head + data.encode() + tail == body.encode()
        assert len(head) + len(data) + len(tail) == length
        assert ("Content-Length", str(length)) in success_headers(boundary, length)


def test_in_flight_limit_per_origin_passes_the_rest_to_synapse() -> None:
    env: Any = SimpleNamespace(config=SimpleNamespace(federation_concurrent=2))
    with federation._slot(env, "a.org"), federation._slot(env, "a.org"):
        with pytest.raises(PassThrough), federation._slot(env, "a.org"):
            pass
        with federation._slot(env, "b.org"):  # other origins have their own slots
            pass
    with federation._slot(env, "a.org"):  # released again
        pass
    assert not federation._in_flight
