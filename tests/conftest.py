"""Shared fixtures: real SeaweedFS, PostgreSQL and Synapse on loopback, started once per session.

Fixtures (all session-scoped unless said otherwise; parts start on first use only):

- ``devstack_dir`` -> Path: the work dir holding every part's files and logs
  (``<pytest tmp>/devstack0/{seaweedfs,postgres,synapse-sqlite,synapse-postgres}``).
- ``seaweed`` -> SeaweedFS: S3 at ``seaweed.endpoint_url``; ``seaweed.client()`` is a botocore
  client talking to it directly.
- ``postgres`` -> Postgres: a throwaway cluster (``host``, ``port``, ``user``, ``psql()``).
- ``synapse_sqlite`` / ``synapse_postgres`` -> Synapse: server names ``sqlite.test`` and
  ``postgres.test``, each with the S3 provider (store_local/remote/synchronous) writing to a
  bucket of its own, ``synapse.s3.bucket`` (``synapse-sqlite`` / ``synapse-postgres``).
- ``synapse`` -> Synapse: parametrized over ``sqlite`` and ``postgres``, so a test using it
  runs once against each (pytest groups the tests by database; each Synapse starts once).
- ``user_token``, ``second_token``, ``admin_token`` -> str: access tokens on ``synapse`` for
  ``@alice`` and ``@bob`` (plain users) and ``@admin`` (server admin); password ``PASSWORD``.
- ``s3_proxy`` -> FaultProxy (tests/faults.py) in front of SeaweedFS's S3 port: give
  ``s3_proxy.url`` as the S3 endpoint to whatever should be observed or hurt (media-proxy).
  Synapse itself talks to SeaweedFS directly.
- ``s3_faults`` (function scope) -> the same FaultProxy with its records and faults cleared
  before and after the test.

Tests under tests/integration are marked ``integration`` automatically (``-m "not integration"``
skips them). Logs of a failed start are quoted in the error; all logs stay under the work dir.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from devstack import Postgres, SeaweedFS, Synapse
from devstack.proxy import RUNNING
from tests.faults import FaultProxy

PASSWORD = "devstack-password"
DATABASES = ("sqlite", "postgres")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A SIGTERM (a CI timeout, `kill`) would end Python without teardown or atexit hooks and
    # orphan the servers; as an interrupt, fixtures stop them by PID.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    integration_dir = Path(__file__).parent / "integration"
    for item in items:
        if integration_dir in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _proxy_logs_stay_clean() -> Iterator[None]:
    """Fail the test during which a running media-proxy printed a traceback or a line that
    is not a JSON event (devstack.proxy.LogProblem)."""
    for proxy in list(RUNNING):
        proxy.check_log()  # what earlier tests left is theirs
    yield
    for proxy in list(RUNNING):
        proxy.check_log()


@pytest.fixture(scope="session")
def devstack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("devstack")


@pytest.fixture(scope="session")
def seaweed(devstack_dir: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(devstack_dir / "seaweedfs").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres(devstack_dir: Path) -> Iterator[Postgres]:
    cluster = Postgres(devstack_dir / "postgres").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _start_synapse(
    devstack_dir: Path, seaweed: SeaweedFS, db: str, postgres: Postgres | None
) -> Synapse:
    s3 = seaweed.create_bucket(f"synapse-{db}")
    database = postgres.create_database(f"synapse_{db}") if postgres is not None else None
    return Synapse(
        devstack_dir / f"synapse-{db}", server_name=f"{db}.test", database=database, s3=s3
    ).start()


@pytest.fixture(scope="session")
def synapse_sqlite(devstack_dir: Path, seaweed: SeaweedFS) -> Iterator[Synapse]:
    server = _start_synapse(devstack_dir, seaweed, "sqlite", None)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def synapse_postgres(
    devstack_dir: Path, seaweed: SeaweedFS, postgres: Postgres
) -> Iterator[Synapse]:
    server = _start_synapse(devstack_dir, seaweed, "postgres", postgres)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", params=DATABASES)
def synapse(request: pytest.FixtureRequest) -> Synapse:
    server: Synapse = request.getfixturevalue(f"synapse_{request.param}")
    return server


@pytest.fixture(scope="session")
def user_token(synapse: Synapse) -> str:
    return synapse.register_user("alice", PASSWORD)


@pytest.fixture(scope="session")
def second_token(synapse: Synapse) -> str:
    return synapse.register_user("bob", PASSWORD)


@pytest.fixture(scope="session")
def admin_token(synapse: Synapse) -> str:
    return synapse.register_user("admin", PASSWORD, admin=True)


@pytest.fixture(scope="session")
def s3_proxy(seaweed: SeaweedFS) -> Iterator[FaultProxy]:
    proxy = FaultProxy(seaweed.host, seaweed.s3_port).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_faults(s3_proxy: FaultProxy) -> Iterator[FaultProxy]:
    s3_proxy.clear_faults()
    s3_proxy.reset()
    try:
        yield s3_proxy
    finally:
        s3_proxy.clear_faults()
        s3_proxy.reset()
