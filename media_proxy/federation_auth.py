"""Federation requests: the `X-Matrix` Authorization header, checked as Synapse checks it.

Pure functions, no I/O: `authenticate` reads the headers in Synapse's order
(`Authenticator.authenticate_request`) and returns either the refusal Synapse would send
for a request it can refuse without any key (malformed header, destination mismatch,
whitelist, no ed25519 signature), or the signatures to verify. `usable_key` applies
Synapse's rule for a key it already stored (`server_keys_json`: the newest row by
`ts_added_ms`, valid until at least now); `verify` checks every signature with the
Matrix ecosystem's own `signedjson`. Where Synapse would fetch a key or answer with an
error text the proxy cannot reproduce exactly (a bad signature), the caller passes the
request through: `None` from these functions means "Synapse decides".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import signedjson.key
import signedjson.sign
from signedjson.types import VerifyKey
from unpaddedbase64 import decode_base64, encode_base64

from media_proxy import headers as h
from media_proxy.parse import valid_server_name

_PREFIX: Final = re.compile(r"^X-Matrix +")
_PARAM_SEPARATOR: Final = re.compile(r"[ \t]*,[ \t]*")
_ESCAPE: Final = re.compile(r"\\(.)")
ALGORITHM: Final = "ed25519"  # signedjson's SUPPORTED_ALGORITHMS
# keyring.py:BANNED_SERVER_SIGNING_KEYS (ELEMENTSEC-2025-1670). Synapse 1.163 compares it
# padded against an unpadded encoding, so it never matches; requests signed with it are
# left to Synapse, which keeps its behaviour whatever it is.
BANNED_KEYS: Final = frozenset({"l/O9hxMVKB6Lg+3Hqf0FQQZhVESQcMzbPN1Cz2nM3og"})
# A stored key must stay valid this long past our clock: Synapse reads its own clock a
# little later, so a key about to expire is left to Synapse (which would fetch a new one).
VALIDITY_MARGIN_MS: Final = 10_000


class Malformed(ValueError):
    """An X-Matrix header Synapse cannot parse: its 400 "Malformed Authorization header"."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An authentication error Synapse sends before looking at any key."""

    status: int
    errcode: str
    error: str

    def body(self) -> bytes:
        return h.error_body(self.errcode, self.error)


@dataclass(frozen=True, slots=True)
class XMatrix:
    """An authenticated-looking request: the origin and every signature the headers carry."""

    origin: str
    signatures: Mapping[str, Mapping[str, str]]  # origin -> key id -> signature

    @property
    def key_ids(self) -> list[str]:
        """The origin's ed25519 key ids (signedjson's `signature_ids`), in header order."""
        return [k for k in self.signatures[self.origin] if k.split(":")[0] == ALGORITHM]


@dataclass(frozen=True, slots=True)
class KeyRow:
    """One `server_keys_json` row for (server, key id)."""

    key_json: bytes
    ts_added_ms: int
    ts_valid_until_ms: int | None


def _unquote(value: str) -> str:
    """A quoted value loses its first and last characters and its backslash escapes."""
    if value.startswith('"'):
        return _ESCAPE.sub(lambda m: m.group(1), value[1:-1])
    return value


def parse_header(value: str) -> tuple[str, str, str, str | None]:
    """(origin, key id, signature, destination or None) of one X-Matrix header value."""
    parts = _PREFIX.split(value, maxsplit=1)
    if len(parts) != 2:
        raise Malformed("no 'X-Matrix ' prefix")
    params: dict[str, str] = {}
    for param in _PARAM_SEPARATOR.split(parts[1]):
        name, eq, val = param.partition("=")
        if not eq:
            raise Malformed("a parameter without '='")
        params[name.lower()] = val
    try:
        origin, key, sig = (_unquote(params[n]) for n in ("origin", "key", "sig"))
    except KeyError:
        raise Malformed("origin, key or sig missing") from None
    if not valid_server_name(origin):
        raise Malformed("origin is not a server name")
    destination = params.get("destination")
    return origin, key, sig, None if destination is None else _unquote(destination)


def _missing() -> Refusal:
    return Refusal(401, "M_UNAUTHORIZED", "Missing Authorization headers")


def authenticate(
    authorization: Sequence[str], server_name: str, whitelist: Sequence[str] | None
) -> XMatrix | Refusal | None:
    """Synapse's checks of the Authorization headers before any key is needed.

    `authorization`: every Authorization header value, in order. None: a header the proxy
    does not read as Synapse would (non-ASCII bytes), left to Synapse.
    """
    if not authorization:
        return _missing()
    if not all(v.isascii() for v in authorization):
        return None
    origin: str | None = None
    signatures: dict[str, dict[str, str]] = {}
    for value in authorization:
        if not value.startswith("X-Matrix"):
            continue  # a Bearer token or anything else: ignored
        try:
            origin, key, sig, destination = parse_header(value)
        except Malformed:
            return Refusal(400, "M_UNAUTHORIZED", "Malformed Authorization header")
        signatures.setdefault(origin, {})[key] = sig
        if destination is not None and destination != server_name:
            message = f"Destination mismatch in auth header, received: {destination!r}"
            return Refusal(401, "M_UNAUTHORIZED", message)
    if whitelist is not None and origin not in whitelist:
        return Refusal(403, "M_FORBIDDEN", f"Federation denied with {origin}.")
    if origin is None:
        return _missing()
    request = XMatrix(origin, signatures)
    if not request.key_ids:
        return Refusal(400, "M_UNAUTHORIZED", f"Not signed by {origin}")
    return request


def signed_object(method: str, uri: str, origin: str, destination: str) -> dict[str, Any]:
    """What the origin signed for a request without a body (GET, HEAD): `uri` is the raw
    request target, percent-encoding and query as received."""
    return {"method": method, "uri": uri, "origin": origin, "destination": destination}


def usable_key(rows: Sequence[KeyRow], key_id: str, now_ms: int) -> VerifyKey | None:
    """The key Synapse would take from its database without fetching, or None.

    Synapse reads the rows by `ts_added_ms` and keeps the last; the key counts if that row
    is valid until now or later, and it is read from `verify_keys` only. None also when
    the newest rows tie and differ (the database's order would decide).
    """
    if not rows:
        return None
    newest = max(r.ts_added_ms for r in rows)
    latest = {(r.key_json, r.ts_valid_until_ms) for r in rows if r.ts_added_ms == newest}
    if len(latest) != 1:
        return None
    ((key_json, valid_until),) = latest
    if (valid_until or 0) < now_ms + VALIDITY_MARGIN_MS:
        return None
    try:
        encoded = json.loads(key_json)["verify_keys"][key_id]["key"]
        key = signedjson.key.decode_verify_key_bytes(key_id, decode_base64(encoded))
    except Exception:  # anything unusual: Synapse's answer (often a 500) is its own
        return None
    if encode_base64(key.encode()) in BANNED_KEYS:
        return None
    return key


def verify(
    request: XMatrix, method: str, uri: str, destination: str, keys: Mapping[str, VerifyKey]
) -> bool:
    """Whether every signature of the origin verifies with its key (`keys` holds one for
    each of `request.key_ids`), as Synapse's keyring requires."""
    obj = {
        **signed_object(method, uri, request.origin, destination),
        "signatures": {o: dict(s) for o, s in request.signatures.items()},
    }
    for key_id in request.key_ids:
        try:
            signedjson.sign.verify_signed_json(obj, request.origin, keys[key_id])
        except Exception:
            return False
    return True
