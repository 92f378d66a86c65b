"""The S3 bucket the Synapse provider writes to, with one long-lived client per process.

Keys are the provider's: `prefix + store path`, prefix verbatim. Calls keep to the subset
Garage supports (SigV4, path-style, GetObject, HeadObject, PutObject, ListObjectsV2), send
SSE-C headers when the provider uses them, and never calculate checksums Garage may not know.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiobotocore.session
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from media_proxy.config import S3Config

_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})


class S3Error(Exception):
    """S3 failed (not "no such key"): the caller falls back to Synapse."""


@dataclass(slots=True)
class S3Object:
    """An open GetObject response; iterate `chunks` once, then `close`."""

    length: int
    _body: Any

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        while True:
            chunk = await self._body.read(size)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._body.close()


class S3:
    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._stack = AsyncExitStack()
        self._client: Any = None

    async def start(self) -> None:
        c = self.config
        session = aiobotocore.session.get_session()
        boto_config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": c.addressing_style},
            connect_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
            max_pool_connections=c.max_pool_connections,
            retries={"max_attempts": 2, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                endpoint_url=c.endpoint_url,
                region_name=c.region_name,
                aws_access_key_id=c.access_key_id,
                aws_secret_access_key=c.secret_access_key,
                aws_session_token=c.session_token,
                config=boto_config,
            )
        )

    async def close(self) -> None:
        await self._stack.aclose()

    def key(self, rel: str) -> str:
        return self.config.prefix + rel

    def _sse(self) -> dict[str, str]:
        if not self.config.sse_customer_key:
            return {}
        return {
            "SSECustomerKey": self.config.sse_customer_key,
            "SSECustomerAlgorithm": self.config.sse_customer_algo,
        }

    async def open(self, rel: str) -> S3Object | None:
        """Start a GET; None when the key does not exist."""
        try:
            resp = await self._client.get_object(
                Bucket=self.config.bucket, Key=self.key(rel), **self._sse()
            )
        except ClientError as e:
            if _error_code(e) in _NOT_FOUND:
                return None
            raise S3Error(f"GetObject {self.key(rel)}: {_error_code(e)}") from e
        except (BotoCoreError, OSError, TimeoutError) as e:
            raise S3Error(f"GetObject {self.key(rel)}: {e}") from e
        return S3Object(int(resp["ContentLength"]), resp["Body"])

    async def size(self, rel: str) -> int | None:
        """The object's size, or None when it does not exist."""
        try:
            resp = await self._client.head_object(
                Bucket=self.config.bucket, Key=self.key(rel), **self._sse()
            )
        except ClientError as e:
            if _error_code(e) in _NOT_FOUND:
                return None
            raise S3Error(f"HeadObject {self.key(rel)}: {_error_code(e)}") from e
        except (BotoCoreError, OSError, TimeoutError) as e:
            raise S3Error(f"HeadObject {self.key(rel)}: {e}") from e
        return int(resp["ContentLength"])

    async def check_bucket(self) -> None:
        """Raise S3Error unless the bucket answers a listing with these credentials."""
        try:
            await self._client.list_objects_v2(
                Bucket=self.config.bucket, Prefix=self.config.prefix, MaxKeys=1
            )
        except ClientError as e:
            raise S3Error(f"ListObjectsV2 {self.config.bucket}: {_error_code(e)}") from e
        except (BotoCoreError, OSError, TimeoutError) as e:
            raise S3Error(f"ListObjectsV2 {self.config.bucket}: {e}") from e


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "unknown"))
