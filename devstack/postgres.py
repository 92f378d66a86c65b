"""A throwaway PostgreSQL cluster on loopback, for running Synapse on its production database.

The postmaster is run in the foreground as our own child (not daemonized by ``pg_ctl``), so it
is stopped by PID like every other part. It trades durability for speed (``fsync=off``): the
cluster only lives as long as the test run or demo.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from devstack.procs import LOOPBACK, ManagedProcess, Part, free_port

SUPERUSER: Final = "postgres"
# initdb and postgres refuse to run as root; as root we run them as this OS user.
_OS_USER: Final = "postgres"


@dataclass(frozen=True)
class PostgresDatabase:
    """How to reach one database: what Synapse's psycopg2 config and media-proxy need."""

    host: str
    port: int
    user: str
    database: str
    password: str | None = None

    @property
    def dsn(self) -> str:
        auth = self.user if self.password is None else f"{self.user}:{self.password}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"


def postgres_bindir() -> Path:
    """$MEDIA_PROXY_PG_BIN, else the newest /usr/lib/postgresql/*/bin, else beside ``initdb``."""
    if env := os.environ.get("MEDIA_PROXY_PG_BIN"):
        return Path(env)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise FileNotFoundError("PostgreSQL binaries not found; set MEDIA_PROXY_PG_BIN")
    return Path(initdb).parent


class Postgres(Part):
    """``initdb`` + ``postgres`` on 127.0.0.1:port, trust auth, TCP only (no Unix socket)."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        self.workdir = workdir.resolve()
        self.log_path = self.workdir / "postgres.log"
        self.bindir = postgres_bindir()
        self.host = LOOPBACK
        self.port = port or free_port()
        self.user = SUPERUSER
        self._as_root = os.geteuid() == 0
        # As root the cluster runs as another user, who usually cannot enter a private tmp
        # dir (pytest's is 0700); its data then lives in a temp dir of its own.
        self._own_data_dir = self._as_root
        self.data_dir = (
            Path(tempfile.gettempdir()) / f"media-proxy-pg-{os.getpid()}-{self.port}"
            if self._own_data_dir
            else self.workdir / "data"
        )
        self.process: ManagedProcess | None = None

    @property
    def _os_user(self) -> str | None:
        return _OS_USER if self._as_root else None

    def _run(self, argv: list[str], *, as_owner: bool) -> str:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            user=self._os_user if as_owner else None,
            group=self._os_user if as_owner else None,
            extra_groups=[] if as_owner and self._as_root else None,
            cwd=self.data_dir if as_owner else None,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{argv[0]} failed ({result.returncode}): {result.stderr.strip() or result.stdout}"
            )
        return result.stdout

    def launch(self) -> None:
        """Create the cluster (``initdb``) and start the postmaster without waiting."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self.data_dir, _OS_USER, _OS_USER)
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                as_owner=True,
            )
        settings = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": "",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        # SIGINT is PostgreSQL's "fast" shutdown; SIGTERM would wait for clients to leave.
        self.process = ManagedProcess(
            "PostgreSQL",
            argv,
            log_path=self.log_path,
            cwd=self.data_dir,
            user=self._os_user,
            stop_signal=signal.SIGINT,
            stop_timeout=10.0,
        )
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until a query succeeds."""
        assert self.process is not None, "launch() first"
        self.process.wait_until(
            lambda: self.psql("SELECT 1").strip() == "1",
            what=f"answering SQL on {self.host}:{self.port}",
            timeout=timeout,
        )

    def stop(self) -> None:
        """Stop the postmaster (idempotent) and remove a temp data dir of our own."""
        super().stop()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run one SQL command with ``psql`` and return its unaligned, tuples-only output."""
        return self._run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                database,
                "-c",
                sql,
            ],
            as_owner=False,
        )

    def create_database(self, name: str) -> PostgresDatabase:
        """Create a database the way Synapse requires (UTF8, C collation) and describe it."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be alphanumeric/underscore: {name!r}")
        self.psql(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
        )
        return self.database(name)

    def database(self, name: str) -> PostgresDatabase:
        """Connection details for an existing database."""
        return PostgresDatabase(host=self.host, port=self.port, user=self.user, database=name)
