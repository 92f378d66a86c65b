"""The S3 bucket the Synapse provider writes to, with one long-lived client per process.

Keys are the provider's: `prefix + store path`, prefix verbatim. Calls keep to the subset
Garage supports (SigV4, path-style, GetObject, HeadObject, PutObject, ListObjectsV2), send
SSE-C headers when the provider uses them, and never calculate checksums Garage may not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final

import aiobotocore.session
import botocore.utils
import structlog
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from media_proxy import metrics, s3get
from media_proxy.breaker import Breaker
from media_proxy.config import S3Config

log = structlog.get_logger(__name__)

_NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound"})
# boto3's upload_file (what the provider uses) goes multipart from 8 MiB, in 8 MiB parts.
MULTIPART_THRESHOLD: Final = 8 * 1024 * 1024
PART_SIZE: Final = 8 * 1024 * 1024


class S3Error(Exception):
    """S3 failed (not "no such key"): the caller falls back to Synapse."""


class S3Unavailable(S3Error):
    """S3 is down, refusing, failing (5xx) or too slow, or the breaker is open: asking
    Synapse would only tie up its thread pool on the same dead S3."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(slots=True)
class S3Object:
    """An open GetObject response; iterate `chunks` once, then `close`. `sha256` is the
    database's hash of the object when known, for whoever streams it to verify."""

    length: int
    _body: Any
    sha256: str | None = None

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
        self._getter: s3get.Getter | None = None  # misses' GETs, where botocore is not needed
        # Serving-path GETs only: an upkeep command should see every error, not a shortcut.
        self.breaker = Breaker(threshold=config.breaker_threshold, cooldown=config.breaker_cooldown)

    async def start(self) -> None:
        c = self.config
        session = aiobotocore.session.get_session()
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=_timestamp
        )
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
        if s3get.usable(c):
            self._getter = s3get.Getter(c)
            self._stack.push_async_callback(self._getter.close)

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
        """Start a GET; None when the key does not exist. Raises S3Unavailable within
        `config.timeout` (retries included), at once while the breaker is open."""
        if not self.breaker.allow():
            metrics.s3_breaker_refused()
            raise S3Unavailable(f"GetObject {rel}: S3 failed repeatedly, not asked for now")
        key = self.key(rel)
        try:
            async with asyncio.timeout(self.config.timeout):
                resp = await self._call(
                    "GetObject",
                    key,
                    self._getter.get(key)
                    if self._getter is not None
                    else self._client.get_object(Bucket=self.config.bucket, Key=key, **self._sse()),
                    missing_ok=True,
                )
        except TimeoutError as e:
            self._failed(S3Unavailable(f"GetObject {key}: no answer in time", timeout=True))
            raise S3Unavailable(f"GetObject {key}: no answer in time", timeout=True) from e
        except S3Unavailable as e:
            self._failed(e)
            raise
        except BaseException:
            self.breaker.success()  # S3 answered (or we gave up): it is not down
            raise
        self.breaker.success()
        return None if resp is None else S3Object(int(resp["ContentLength"]), resp["Body"])

    def _failed(self, error: S3Unavailable) -> None:
        if self.breaker.failure():
            metrics.s3_breaker_opened()
            log.warning(
                "s3.breaker_open", error=str(error), retry_in_s=self.config.breaker_cooldown
            )

    async def size(self, rel: str) -> int | None:
        """The object's size, or None when it does not exist."""
        key = self.key(rel)
        resp = await self._call(
            "HeadObject",
            key,
            self._getter.head(key)  # without botocore: its CPU was most of an eviction's
            if self._getter is not None
            else self._client.head_object(Bucket=self.config.bucket, Key=key, **self._sse()),
            missing_ok=True,
        )
        return None if resp is None else int(resp["ContentLength"])

    async def check_bucket(self) -> None:
        """Raise S3Error unless the bucket answers a listing with these credentials."""
        await self._call(
            "ListObjectsV2",
            self.config.bucket,
            self._client.list_objects_v2(
                Bucket=self.config.bucket, Prefix=self.config.prefix, MaxKeys=1
            ),
        )

    def _put_args(self) -> dict[str, str]:
        """What the provider's upload_file sends: storage class and SSE-C, no Content-Type."""
        return {"StorageClass": self.config.storage_class, **self._sse()}

    async def put_file(self, rel: str, path: str) -> int:
        """Upload the file at `path` to `rel`'s key (one PUT, or multipart from 8 MiB, as the
        provider does); returns the bytes sent. An object appears only once complete; a
        multipart upload that fails is aborted."""
        key = self.key(rel)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < MULTIPART_THRESHOLD:
                body = await asyncio.to_thread(os.pread, fd, size, 0)
                await self._call(
                    "PutObject",
                    key,
                    self._client.put_object(
                        Bucket=self.config.bucket, Key=key, Body=body, **self._put_args()
                    ),
                )
                return len(body)
            return await self._put_multipart(key, fd, size)
        finally:
            os.close(fd)

    async def _put_multipart(self, key: str, fd: int, size: int) -> int:
        bucket = self.config.bucket
        created = await self._call(
            "CreateMultipartUpload",
            key,
            self._client.create_multipart_upload(Bucket=bucket, Key=key, **self._put_args()),
        )
        upload_id = created["UploadId"]
        parts: list[dict[str, Any]] = []
        sent = 0
        try:
            for number, offset in enumerate(range(0, size, PART_SIZE), start=1):
                body = await asyncio.to_thread(os.pread, fd, min(PART_SIZE, size - offset), offset)
                part = await self._call(
                    "UploadPart",
                    key,
                    self._client.upload_part(
                        Bucket=bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                        **self._sse(),
                    ),
                )
                parts.append({"ETag": part["ETag"], "PartNumber": number})
                sent += len(body)
            await self._call(
                "CompleteMultipartUpload",
                key,
                self._client.complete_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                ),
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(
                    Bucket=bucket, Key=key, UploadId=upload_id
                )
            raise
        return sent

    async def list_objects(self, rel_prefix: str = "") -> AsyncIterator[tuple[str, int]]:
        """(store path, size) of every object under `prefix + rel_prefix` (ListObjectsV2)."""
        prefix = self.key(rel_prefix)
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = await self._call(
                "ListObjectsV2",
                prefix,
                self._client.list_objects_v2(Bucket=self.config.bucket, Prefix=prefix, **extra),
            )
            for obj in page.get("Contents", []):
                yield obj["Key"][len(self.config.prefix) :], int(obj["Size"])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def _call(self, what: str, key: str, call: Any, *, missing_ok: bool = False) -> Any:
        """Await one S3 call; errors become S3Error, or None for a missing key if allowed."""
        try:
            return await metrics.s3_call(what, call)
        except ClientError as e:
            if missing_ok and _error_code(e) in _NOT_FOUND:
                return None
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if int(status) >= 500:
                raise S3Unavailable(f"{what} {key}: {status} {_error_code(e)}") from e
            raise S3Error(f"{what} {key}: {_error_code(e)}") from e
        except TimeoutError as e:
            raise S3Unavailable(f"{what} {key}: timed out", timeout=True) from e
        except (BotoCoreError, OSError) as e:
            raise S3Unavailable(f"{what} {key}: {e}") from e

    # The media lifecycle (lifecycle.py): listing pages with dates, batched deletes.

    async def list_pages(
        self, rel_prefix: str = "", *, page_size: int = 1000, start_after: str | None = None
    ) -> AsyncIterator[list[tuple[str, int, float]]]:
        """Pages of (store path, size, LastModified as epoch seconds) under `prefix +
        rel_prefix`, in the listing's (key) order, from after the store path `start_after`
        on: one ListObjectsV2 call per page."""
        prefix = self.key(rel_prefix)
        after = self.key(start_after) if start_after else None
        cut = len(self.config.prefix)
        token: str | None = None
        if self._getter is not None:  # without botocore's parser: most of a page's CPU
            while True:
                lean = await self._call(
                    "ListObjectsV2",
                    prefix,
                    self._getter.list_page(prefix, token, page_size, after),
                )
                yield [(key[cut:], size, modified) for key, size, modified in lean.objects]
                if lean.next_token is None:
                    return
                token = lean.next_token
        while True:
            extra = {"ContinuationToken": token} if token else {}
            if after and not token:
                extra["StartAfter"] = after
            page = await self._call(
                "ListObjectsV2",
                prefix,
                self._client.list_objects_v2(
                    Bucket=self.config.bucket, Prefix=prefix, MaxKeys=page_size, **extra
                ),
            )
            yield [
                (o["Key"][cut:], int(o["Size"]), o["LastModified"].timestamp())
                for o in page.get("Contents", [])
            ]
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def delete_objects(self, rels: list[str]) -> dict[str, str]:
        """Delete the objects of these store paths (DeleteObjects, Quiet, up to 1000 keys a
        request); returns {store path: error code} for each key S3 refused. Deleting a key
        that does not exist is a success in S3, so a re-run is harmless."""
        errors: dict[str, str] = {}
        cut = len(self.config.prefix)
        batch = 1000  # DeleteObjects' limit
        for i in range(0, len(rels), batch):
            keys = [self.key(rel) for rel in rels[i : i + batch]]
            resp = await self._call(
                "DeleteObjects",
                keys[0],
                self._client.delete_objects(
                    Bucket=self.config.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
                ),
            )
            for err in resp.get("Errors", []):
                errors[str(err.get("Key", ""))[cut:]] = str(err.get("Code", "unknown"))
        return errors


def _timestamp(value: str) -> datetime.datetime:
    """Listing dates (ISO 8601) parsed natively: botocore's dateutil parser is most of the
    CPU a ListObjectsV2 page costs (1,000 dates). Anything else goes to botocore's."""
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return botocore.utils.parse_timestamp(value)  # type: ignore[no-any-return]
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.UTC)


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", "unknown"))
