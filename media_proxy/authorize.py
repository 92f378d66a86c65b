"""Step 2: is this client allowed to download, exactly as Synapse would decide.

Token extraction follows Synapse's rules to the letter (a pure function). Validation is
Synapse's own: `whoami` makes the very call the media servlet makes, so appservices,
guests, expiry, locks and delegated auth all come out right, and its error answer is
returned verbatim. Answers are remembered in a bounded TTL cache, failures for less long.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import cachetools

from media_proxy import metrics
from media_proxy.headers import error_body
from media_proxy.inflight import Inflight
from media_proxy.parse import Query

# Query parameters that change who the request acts as (application-service masquerading).
IDENTITY_PARAMS: Final = ("user_id", "device_id", "org.matrix.msc3202.device_id")


@dataclass(frozen=True, slots=True)
class Denied:
    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class Credentials:
    token: str
    from_header: bool
    identity: tuple[tuple[str, str], ...]  # masquerading parameters, first values

    @property
    def cache_key(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        return self.token, self.identity


def _missing(message: str) -> Denied:
    return Denied(401, error_body("M_MISSING_TOKEN", message))


def credentials(authorization: Sequence[str], query: Query) -> Credentials | Denied:
    """Synapse's `get_access_token_from_request`, including its errors."""
    from_query = query.get("access_token")
    if authorization:
        if from_query is not None:
            return _missing("Mixing Authorization headers and access_token query parameters.")
        if len(authorization) > 1:
            return _missing("Too many Authorization headers.")
        parts = authorization[0].split(" ")
        if len(parts) != 2 or parts[0] != "Bearer":
            return _missing("Invalid Authorization header.")
        token, from_header = parts[1], True
    elif not from_query:
        return _missing("Missing access token")
    else:
        token, from_header = from_query[0], False
    identity = tuple((name, query[name][0]) for name in IDENTITY_PARAMS if name in query)
    return Credentials(token, from_header, identity)


class SynapseUnavailable(Exception):
    """Synapse could not say; the request goes to Synapse itself."""


class WhoAmI(Protocol):
    """Asks Synapse who a token belongs to (`passthrough.SynapseClient`)."""

    async def whoami(self, creds: Credentials, client_ip: str | None) -> Denied | None: ...


class Authorizer:
    def __init__(self, synapse: WhoAmI, *, ttl: float, failure_ttl: float, maxsize: int) -> None:
        self._synapse = synapse
        self._allowed: cachetools.TTLCache[object, bool] = cachetools.TTLCache(maxsize, ttl)
        self._denied: cachetools.TTLCache[object, Denied] = cachetools.TTLCache(
            maxsize, failure_ttl
        )
        self._inflight: Inflight[Denied | None] = Inflight()

    async def check(self, creds: Credentials, client_ip: str | None) -> Denied | None:
        """None if allowed; raises SynapseUnavailable when Synapse cannot answer.

        Answers are keyed by everything Synapse's depends on: the token, the identity it
        asserts, and the client's address (an appservice token is refused from outside its
        `ip_range_whitelist`, so an answer for one address says nothing about another).
        """
        key = (creds.cache_key, client_ip)
        if key in self._allowed:
            metrics.cache_lookup("auth", hit=True)
            return None
        denied = self._denied.get(key)
        metrics.cache_lookup("auth", hit=denied is not None)
        if denied is not None:
            return denied
        result = await self._inflight.run(key, lambda: self._synapse.whoami(creds, client_ip))
        if result is None:
            self._allowed[key] = True
        else:
            self._denied[key] = result
        return result
