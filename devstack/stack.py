"""SeaweedFS + (optionally) PostgreSQL + Synapse wired together under one work dir.

This is what the demo and the benchmarks start; the tests compose the same parts themselves
(one SeaweedFS and one PostgreSQL shared by two Synapses).
"""

from __future__ import annotations

import atexit
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from devstack.postgres import Postgres
from devstack.seaweed import S3Config, SeaweedFS
from devstack.synapse import DEFAULT_SERVER_NAME, Synapse


class Stack:
    """Start everything with ``start()`` (or ``with Stack(dir) as stack:``), stop with ``stop()``.

    Layout: ``<workdir>/seaweedfs``, ``<workdir>/postgres``, ``<workdir>/synapse``, each with
    its own log file. ``synapse_s3_endpoint`` makes Synapse reach S3 through another URL
    (e.g. a fault-injecting proxy) instead of SeaweedFS directly.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        use_postgres: bool = False,
        server_name: str = DEFAULT_SERVER_NAME,
        bucket: str = "media",
        synapse_port: int | None = None,
        synapse_config: Mapping[str, Any] | None = None,
        synapse_s3_endpoint: str | None = None,
        synapse_log_level: str = "INFO",
    ) -> None:
        self.workdir = workdir.resolve()
        self.server_name = server_name
        self.bucket = bucket
        self.seaweed = SeaweedFS(self.workdir / "seaweedfs")
        self.postgres = Postgres(self.workdir / "postgres") if use_postgres else None
        self._synapse_port = synapse_port
        self._synapse_config = dict(synapse_config or {})
        self._synapse_s3_endpoint = synapse_s3_endpoint
        self._synapse_log_level = synapse_log_level
        self._synapse: Synapse | None = None
        self.s3: S3Config | None = None

    @property
    def synapse(self) -> Synapse:
        if self._synapse is None:
            raise RuntimeError("Stack.start() first")
        return self._synapse

    def start(self) -> Self:
        """Start SeaweedFS and PostgreSQL side by side, create the bucket, then Synapse."""
        atexit.register(self.stop)
        try:
            self.seaweed.launch()
            if self.postgres is not None:
                self.postgres.launch()
            self.seaweed.wait_ready()
            self.s3 = self.seaweed.create_bucket(self.bucket)
            database = None
            if self.postgres is not None:
                self.postgres.wait_ready()
                database = self.postgres.create_database("synapse")
            self._synapse = Synapse(
                self.workdir / "synapse",
                server_name=self.server_name,
                database=database,
                s3=self.seaweed.s3_config(self.bucket, endpoint_url=self._synapse_s3_endpoint),
                port=self._synapse_port,
                extra_config=self._synapse_config,
                log_level=self._synapse_log_level,
            )
            self._synapse.start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop what was started, Synapse first (idempotent)."""
        if self._synapse is not None:
            self._synapse.stop()
        if self.postgres is not None:
            self.postgres.stop()
        self.seaweed.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
