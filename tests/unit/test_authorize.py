"""authorize.py: Synapse's access-token extraction rules and the whoami answer cache.

`credentials()` is compared with Synapse's own `BaseAuth.get_access_token_from_request`
(run in the Synapse virtualenv, as a subprocess) on the same headers and raw query strings,
including the exact 401 bodies. The `Authorizer` tests use a tiny in-test `WhoAmI` that
counts calls; the real whoami path is covered by the integration tests.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import cachetools
import pytest

from media_proxy import authorize
from media_proxy.authorize import (
    Authorizer,
    Credentials,
    Denied,
    SynapseUnavailable,
    credentials,
)
from media_proxy.parse import parse_query
from tests.unit.synapse_oracle import run_synapse


def missing(message: str) -> Denied:
    body = json.dumps({"errcode": "M_MISSING_TOKEN", "error": message}, separators=(",", ":"))
    return Denied(401, body.encode())


# --- credentials(): token extraction -----------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "query", "expected"),
    [
        (["Bearer abc"], "", Credentials("abc", True, ())),
        (["Bearer "], "", Credentials("", True, ())),  # two parts: an empty token
        ([], "access_token=abc", Credentials("abc", False, ())),
        ([], "access_token=abc&access_token=def", Credentials("abc", False, ())),
        ([], "access_token=", Credentials("", False, ())),  # blank kept, as in Synapse
        ([], "access_token=a%2Bb+c", Credentials("a+b c", False, ())),
        (["bearer abc"], "", missing("Invalid Authorization header.")),
        (["BEARER abc"], "", missing("Invalid Authorization header.")),
        (["Bearer  abc"], "", missing("Invalid Authorization header.")),  # two spaces
        (["Bearer abc def"], "", missing("Invalid Authorization header.")),
        (["Bearer"], "", missing("Invalid Authorization header.")),
        (["Bearer\tabc"], "", missing("Invalid Authorization header.")),
        (["Basic YTpi"], "", missing("Invalid Authorization header.")),
        ([" Bearer abc"], "", missing("Invalid Authorization header.")),
        ([""], "", missing("Invalid Authorization header.")),
        (["Bearer abc", "Bearer abc"], "", missing("Too many Authorization headers.")),
        (["Bearer abc", "Bearer def"], "", missing("Too many Authorization headers.")),
        (
            ["Bearer abc"],
            "access_token=abc",
            missing("Mixing Authorization headers and access_token query parameters."),
        ),
        (
            ["Bearer abc"],
            "access_token=",
            missing("Mixing Authorization headers and access_token query parameters."),
        ),
        (
            # the mixing check comes before the count
            ["Bearer abc", "Bearer def"],
            "access_token=abc",
            missing("Mixing Authorization headers and access_token query parameters."),
        ),
        ([], "", missing("Missing access token")),
        ([], "user_id=%40bot%3Ahs", missing("Missing access token")),
        ([], "Access_Token=abc", missing("Missing access token")),
    ],
)
def test_credentials(authorization: list[str], query: str, expected: Any) -> None:
    assert credentials(authorization, parse_query(query)) == expected


def test_missing_token_body_is_canonical_json() -> None:
    got = credentials([], {})
    assert got == Denied(401, b'{"errcode":"M_MISSING_TOKEN","error":"Missing access token"}')


@pytest.mark.parametrize(
    ("query", "identity"),
    [
        ("", ()),
        ("user_id=%40bot%3Ahs", (("user_id", "@bot:hs"),)),
        ("device_id=DEV&user_id=%40a%3Ahs", (("user_id", "@a:hs"), ("device_id", "DEV"))),
        ("user_id=%40a%3Ahs&user_id=%40b%3Ahs", (("user_id", "@a:hs"),)),  # first wins
        ("user_id=", (("user_id", ""),)),
        ("org.matrix.msc3202.device_id=D", (("org.matrix.msc3202.device_id", "D"),)),
        ("width=32&allow_remote=false&timeout_ms=5", ()),  # not identity parameters
    ],
)
def test_identity_params(query: str, identity: tuple[tuple[str, str], ...]) -> None:
    got = credentials(["Bearer tok"], parse_query(query))
    assert isinstance(got, Credentials)
    assert got.identity == identity
    assert got.cache_key == ("tok", identity)


def test_cache_key_separates_tokens_and_identities() -> None:
    def key(authorization: list[str], query: str) -> object:
        got = credentials(authorization, parse_query(query))
        assert isinstance(got, Credentials)
        return got.cache_key

    keys = {
        key(["Bearer a"], ""),
        key(["Bearer b"], ""),
        key(["Bearer a"], "user_id=%40x%3Ahs"),
        key(["Bearer a"], "user_id=%40y%3Ahs"),
        key(["Bearer a"], "user_id=%40x%3Ahs&device_id=D"),
    }
    assert len(keys) == 5
    # header or query: the same token is the same identity for Synapse
    assert key(["Bearer a"], "") == key([], "access_token=a")
    # unrelated parameters do not split the cache
    assert key(["Bearer a"], "") == key(["Bearer a"], "timeout_ms=5&x=y")


# --- differential: Synapse's get_access_token_from_request ------------------------------


TOKEN_CASES: list[Any] = [
    ([], ""),
    ([], "access_token=abc"),
    ([], "access_token="),
    ([], "access_token=abc&access_token=def"),
    ([], "access_token=a%2Bb+c"),
    ([], "x=1"),
    (["Bearer abc"], ""),
    (["Bearer "], ""),
    (["bearer abc"], ""),
    (["Bearer  abc"], ""),
    (["Bearer abc def"], ""),
    (["Bearer"], ""),
    ([""], ""),
    (["Basic YTpi"], ""),
    (["Bearer abc", "Bearer abc"], ""),
    (["Bearer abc"], "access_token=abc"),
    (["Bearer abc"], "access_token="),
    (["Bearer abc", "Bearer def"], "access_token=x"),
    *[
        pytest.param(h, q)
        for h, q in [
            ([], "access_token"),  # Synapse: "Missing access token"
            (["Bearer abc"], "access_token"),  # Synapse: token "abc"
            ([], "access_token=abc;user_id=x"),  # Synapse: token "abc"
            (["Bearer abc"], "x=1;access_token=abc"),  # Synapse: mixing error
        ]
    ],
]

_TOKEN_SCRIPT = """
import json, sys
from canonicaljson import encode_canonical_json
from twisted.web.http import parse_qs
from twisted.web.http_headers import Headers
from synapse.api.auth.base import BaseAuth
from synapse.api.errors import MissingClientTokenError

class FakeRequest:
    def __init__(self, authorization, query):
        self.requestHeaders = Headers()
        for value in authorization:
            self.requestHeaders.addRawHeader(b"Authorization", value.encode("ascii"))
        self.args = parse_qs(query.encode("ascii"), 1)

out = []
for authorization, query in json.load(sys.stdin):
    try:
        token = BaseAuth.get_access_token_from_request(FakeRequest(authorization, query))
        out.append({"token": token})
    except MissingClientTokenError as e:
        body = encode_canonical_json(e.error_dict(None)).decode("utf-8")
        out.append({"status": e.code, "body": body})
print(json.dumps(out))
"""


def _case(param: Any) -> tuple[list[str], str]:
    values = param.values if hasattr(param, "values") else param
    return list(values[0]), values[1]


@pytest.fixture(scope="module")
def synapse_tokens() -> dict[str, dict[str, Any]]:
    cases = [_case(c) for c in TOKEN_CASES]
    answers = run_synapse(_TOKEN_SCRIPT, cases)
    return {json.dumps(c): a for c, a in zip(cases, answers, strict=True)}


@pytest.mark.parametrize(("authorization", "query"), TOKEN_CASES)
def test_credentials_match_synapse(
    authorization: list[str], query: str, synapse_tokens: dict[str, dict[str, Any]]
) -> None:
    theirs = synapse_tokens[json.dumps([authorization, query])]
    ours = credentials(authorization, parse_query(query))
    if "token" in theirs:
        assert isinstance(ours, Credentials)
        assert ours.token == theirs["token"]
        assert ours.from_header is bool(authorization)
    else:
        assert ours == Denied(theirs["status"], theirs["body"].encode("utf-8"))


# --- Authorizer --------------------------------------------------------------------------

ALICE = Credentials("alice-token", True, ())
BOB = Credentials("bob-token", False, ())
ALICE_AS_BOT = Credentials("alice-token", True, (("user_id", "@bot:hs"),))
UNKNOWN = Denied(
    401,
    b'{"errcode":"M_UNKNOWN_TOKEN","error":"Invalid access token passed.","soft_logout":false}',
)


class FakeWhoAmI:
    """Answers from a table, counting calls; `gate` holds every call until set."""

    def __init__(self, answers: dict[str, Denied | Exception | None]) -> None:
        self.answers = answers
        self.calls: list[tuple[Credentials, str | None]] = []
        self.gate: asyncio.Event | None = None

    async def whoami(self, creds: Credentials, client_ip: str | None) -> Denied | None:
        self.calls.append((creds, client_ip))
        if self.gate is not None:
            await self.gate.wait()
        answer = self.answers[creds.token]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Make the Authorizer's TTL caches read a clock the test moves by hand."""
    clock = Clock()
    real = cachetools.TTLCache

    def ttl_cache(maxsize: int, ttl: float) -> cachetools.TTLCache[Any, Any]:
        return real(maxsize, ttl, timer=clock)

    monkeypatch.setattr(authorize, "cachetools", SimpleNamespace(TTLCache=ttl_cache))
    return clock


def make(
    answers: dict[str, Denied | Exception | None],
    *,
    ttl: float = 10.0,
    failure_ttl: float = 2.0,
    maxsize: int = 100,
) -> tuple[Authorizer, FakeWhoAmI]:
    synapse = FakeWhoAmI(answers)
    return Authorizer(synapse, ttl=ttl, failure_ttl=failure_ttl, maxsize=maxsize), synapse


async def test_allowed_is_cached_for_ttl(clock: Clock) -> None:
    auth, synapse = make({"alice-token": None})
    assert await auth.check(ALICE, "10.0.0.1") is None
    assert synapse.calls == [(ALICE, "10.0.0.1")]
    clock.now += 9.9
    assert await auth.check(ALICE, "10.0.0.1") is None
    assert len(synapse.calls) == 1
    clock.now += 0.2  # past the 10 s ttl
    assert await auth.check(ALICE, "10.0.0.1") is None
    assert synapse.calls[1:] == [(ALICE, "10.0.0.1")]


async def test_answers_are_per_client_address(clock: Clock) -> None:
    """An appservice token is accepted only from its ip_range_whitelist: Synapse's answer
    for one address must never be reused for another."""
    auth, synapse = make({"alice-token": None})
    assert await auth.check(ALICE, "10.0.0.1") is None
    synapse.answers["alice-token"] = UNKNOWN  # as Synapse answers outside the whitelist
    assert await auth.check(ALICE, "192.0.2.7") == UNKNOWN
    assert await auth.check(ALICE, "10.0.0.1") is None  # the first address's answer stands
    assert synapse.calls == [(ALICE, "10.0.0.1"), (ALICE, "192.0.2.7")]


async def test_denied_is_cached_for_failure_ttl_only(clock: Clock) -> None:
    auth, synapse = make({"bob-token": UNKNOWN})
    assert await auth.check(BOB, None) == UNKNOWN
    clock.now += 1.9
    assert await auth.check(BOB, None) == UNKNOWN
    assert len(synapse.calls) == 1
    clock.now += 0.2  # past failure_ttl (2 s), well before ttl (10 s)
    assert await auth.check(BOB, None) == UNKNOWN
    assert len(synapse.calls) == 2


async def test_answer_change_is_seen_after_expiry(clock: Clock) -> None:
    auth, synapse = make({"alice-token": None})
    assert await auth.check(ALICE, None) is None
    synapse.answers["alice-token"] = UNKNOWN  # logged out
    assert await auth.check(ALICE, None) is None  # still trusted within the ttl
    clock.now += 10.1
    assert await auth.check(ALICE, None) == UNKNOWN
    synapse.answers["alice-token"] = None  # e.g. an unlocked account
    assert await auth.check(ALICE, None) == UNKNOWN
    clock.now += 2.1
    assert await auth.check(ALICE, None) is None
    assert len(synapse.calls) == 3


async def test_keys_are_separate(clock: Clock) -> None:
    auth, synapse = make({"alice-token": None, "bob-token": UNKNOWN})
    assert await auth.check(ALICE, None) is None
    assert await auth.check(BOB, None) == UNKNOWN
    assert await auth.check(ALICE_AS_BOT, None) is None  # same token, other identity
    assert [c for c, _ in synapse.calls] == [ALICE, BOB, ALICE_AS_BOT]
    assert await auth.check(ALICE, None) is None
    assert await auth.check(BOB, None) == UNKNOWN
    assert await auth.check(ALICE_AS_BOT, None) is None
    assert len(synapse.calls) == 3


async def test_cache_is_bounded(clock: Clock) -> None:
    auth, synapse = make({"alice-token": None, "bob-token": None}, maxsize=1)
    await auth.check(ALICE, None)
    await auth.check(BOB, None)  # evicts alice
    await auth.check(ALICE, None)
    assert [c for c, _ in synapse.calls] == [ALICE, BOB, ALICE]


async def test_concurrent_checks_make_one_call(clock: Clock) -> None:
    auth, synapse = make({"alice-token": None, "bob-token": UNKNOWN})
    synapse.gate = asyncio.Event()
    alice = [asyncio.create_task(auth.check(ALICE, "10.0.0.1")) for _ in range(5)]
    bob = [asyncio.create_task(auth.check(BOB, None)) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert [c for c, _ in synapse.calls] == [ALICE, BOB]
    synapse.gate.set()
    assert await asyncio.gather(*alice) == [None] * 5
    assert await asyncio.gather(*bob) == [UNKNOWN] * 3
    assert len(synapse.calls) == 2


async def test_synapse_unavailable_is_not_cached(clock: Clock) -> None:
    auth, synapse = make({"alice-token": SynapseUnavailable("connection refused")})
    synapse.gate = asyncio.Event()
    waiters = [asyncio.create_task(auth.check(ALICE, None)) for _ in range(3)]
    await asyncio.sleep(0.01)
    synapse.gate.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, SynapseUnavailable) for r in results)
    assert len(synapse.calls) == 1  # the waiters shared one call
    synapse.gate = None
    with pytest.raises(SynapseUnavailable):
        await auth.check(ALICE, None)
    assert len(synapse.calls) == 2  # no time passed, yet Synapse was asked again
    synapse.answers["alice-token"] = None
    assert await auth.check(ALICE, None) is None
    assert len(synapse.calls) == 3


async def test_real_clock_expiry() -> None:
    """Without the fake clock: the caches really expire (short TTLs, real sleeps)."""
    auth, synapse = make({"alice-token": None, "bob-token": UNKNOWN}, ttl=0.3, failure_ttl=0.1)
    await auth.check(ALICE, None)
    await auth.check(BOB, None)
    await auth.check(ALICE, None)
    await auth.check(BOB, None)
    assert len(synapse.calls) == 2
    await asyncio.sleep(0.15)
    await auth.check(ALICE, None)  # still cached
    await auth.check(BOB, None)  # expired
    assert [c for c, _ in synapse.calls] == [ALICE, BOB, BOB]
    await asyncio.sleep(0.2)
    await auth.check(ALICE, None)
    assert [c for c, _ in synapse.calls] == [ALICE, BOB, BOB, ALICE]
