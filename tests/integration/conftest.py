"""media-proxy in front of each test Synapse: `media-proxy serve` with 3 workers, its S3
traffic going through the session's fault proxy (`s3_proxy`) so tests can count and hurt it.

Caches and TTLs are short so that tests see quarantines and access times within a second.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import Synapse
from devstack.proxy import MediaProxy
from tests.faults import FaultProxy

TEST_PROXY_CONFIG = {
    "metadata_cache_ttl": 0.5,
    "auth_cache_ttl": 0.5,
    "auth_failure_ttl": 0.5,
    "access_flush_interval": 0.5,
}


@pytest.fixture(scope="session")
def proxy(synapse: Synapse, s3_proxy: FaultProxy, devstack_dir: Path) -> Iterator[MediaProxy]:
    media_proxy = MediaProxy(
        devstack_dir / f"media-proxy-{synapse.server_name}",
        synapse_config=synapse.config_path,
        synapse_url=synapse.url,
        workers=3,
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
    ).start()
    yield media_proxy
    media_proxy.stop()


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `where` (a full or read-only disk on demand); the
    test is skipped where mounting is not allowed."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
