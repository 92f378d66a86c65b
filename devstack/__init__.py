"""Real SeaweedFS, PostgreSQL and Synapse on loopback, for tests, the demo and benchmarks.

Nothing here is used by the proxy at run time; it exists so that every check runs against the
real parts rather than mocks. Start one part (``SeaweedFS(dir).start()``) or the whole stack
(``Stack(dir).start()``); every process is stopped by PID, and at interpreter exit at the latest.
"""

from devstack.postgres import Postgres, PostgresDatabase
from devstack.procs import ManagedProcess, StartupError, free_port, stop_all
from devstack.seaweed import S3Config, SeaweedFS, s3_client
from devstack.stack import Stack
from devstack.synapse import (
    Database,
    SqliteDatabase,
    Synapse,
    SynapseError,
    local_content_key,
    parse_mxc,
)

__all__ = [
    "Database",
    "ManagedProcess",
    "Postgres",
    "PostgresDatabase",
    "S3Config",
    "SeaweedFS",
    "SqliteDatabase",
    "Stack",
    "StartupError",
    "Synapse",
    "SynapseError",
    "free_port",
    "local_content_key",
    "parse_mxc",
    "s3_client",
    "stop_all",
]
