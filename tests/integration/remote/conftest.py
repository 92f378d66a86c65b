"""Two homeservers federating over loopback, for remote media.

- ``origin`` -> Synapse B (SQLite, no S3): where remote media are uploaded.
- ``home_sqlite`` / ``home_postgres`` -> Synapse A, each with the S3 provider (store_remote:
  what A fetches from B goes to S3 too), on SQLite and PostgreSQL; ``home`` is parametrized
  over both, like ``synapse``.
- ``home_proxy`` -> media-proxy (3 workers) in front of ``home``, its S3 traffic through the
  session's fault proxy (``s3_proxy`` / ``s3_faults``).
- ``home_token``, ``home_admin_token``, ``origin_token``: access tokens.

Server names are ``127.0.0.1:<TLS port>`` (devstack ``Synapse(federation=True)``): an IP
literal with a port, which Synapse connects to directly, so no DNS is involved.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack import Postgres, SeaweedFS, Synapse
from devstack.proxy import MediaProxy
from tests.conftest import DATABASES, PASSWORD
from tests.faults import FaultProxy
from tests.integration.conftest import TEST_PROXY_CONFIG


@pytest.fixture(scope="session")
def origin(devstack_dir: Path) -> Iterator[Synapse]:
    server = Synapse(devstack_dir / "synapse-origin", federation=True).start()
    try:
        yield server
    finally:
        server.stop()


def _start_home(
    devstack_dir: Path, seaweed: SeaweedFS, db: str, postgres: Postgres | None
) -> Synapse:
    s3 = seaweed.create_bucket(f"home-{db}")
    database = postgres.create_database(f"home_{db}") if postgres is not None else None
    return Synapse(
        devstack_dir / f"synapse-home-{db}", database=database, s3=s3, federation=True
    ).start()


@pytest.fixture(scope="session")
def home_sqlite(devstack_dir: Path, seaweed: SeaweedFS, origin: Synapse) -> Iterator[Synapse]:
    server = _start_home(devstack_dir, seaweed, "sqlite", None)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def home_postgres(
    devstack_dir: Path, seaweed: SeaweedFS, postgres: Postgres, origin: Synapse
) -> Iterator[Synapse]:
    server = _start_home(devstack_dir, seaweed, "postgres", postgres)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", params=DATABASES)
def home(request: pytest.FixtureRequest) -> Synapse:
    server: Synapse = request.getfixturevalue(f"home_{request.param}")
    return server


@pytest.fixture(scope="session")
def home_proxy(home: Synapse, s3_proxy: FaultProxy, devstack_dir: Path) -> Iterator[MediaProxy]:
    media_proxy = MediaProxy(
        devstack_dir / f"media-proxy-home-{home.database.__class__.__name__}",
        synapse_config=home.config_path,
        synapse_url=home.url,
        workers=3,
        config={**TEST_PROXY_CONFIG, "s3": {"endpoint_url": s3_proxy.url}},
    ).start()
    yield media_proxy
    media_proxy.stop()


@pytest.fixture(scope="session")
def home_token(home: Synapse) -> str:
    return home.register_user("carol", PASSWORD)


@pytest.fixture(scope="session")
def home_admin_token(home: Synapse) -> str:
    return home.register_user("root", PASSWORD, admin=True)


@pytest.fixture(scope="session")
def origin_token(origin: Synapse) -> str:
    return origin.register_user("dave", PASSWORD)
