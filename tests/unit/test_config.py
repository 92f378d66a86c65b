"""config.py: reading homeserver.yaml (+ conf.d), the proxy's own file, environment secrets
and command-line overrides; and the CLI's one-line configuration errors."""

from __future__ import annotations

import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest

from media_proxy import cli, logs
from media_proxy.config import (
    ENV_SECRETS,
    ConfigError,
    S3Config,
    load,
    masked,
    parse_listen,
    parse_size,
)
from tests.unit.synapse_oracle import run_synapse

URL = {"synapse_url": "http://127.0.0.1:8008"}
S3_MODULE = "s3_storage_provider.S3StorageProviderBackend"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def hs_file(tmp_path: Path, text: str = "") -> Path:
    text = "server_name: example.org\n" + textwrap.dedent(text)
    return write(tmp_path / "synapse" / "homeserver.yaml", text)


def load_hs(tmp_path: Path, text: str = "", **kwargs: Any) -> Any:
    kwargs.setdefault("overrides", URL)
    kwargs.setdefault("environ", {})
    return load(synapse_config=[hs_file(tmp_path, text)], **kwargs)


def config_error(**kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return info.value


# --- defaults and paths ------------------------------------------------------------------


def test_minimal_homeserver_yaml(tmp_path: Path) -> None:
    hs = hs_file(tmp_path)
    config = load(
        synapse_config=[hs], overrides={"synapse_url": "http://127.0.0.1:8008/"}, environ={}
    )
    store = tmp_path / "synapse" / "media_store"
    assert config.server_name == "example.org"
    assert config.media_store_path == store
    assert config.cache_path == store  # the cache is the store unless told otherwise
    assert config.database.engine == "sqlite3"
    assert config.database.args == {"database": str(tmp_path / "synapse" / "homeserver.db")}
    assert config.s3 is None
    assert config.enable_local_media_storage is True
    assert config.enable_authenticated_media is True
    assert config.max_upload_size == 50 * 1024 * 1024
    assert config.synapse_url == "http://127.0.0.1:8008"  # trailing slash dropped
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 8011)
    assert config.synapse_config == (hs,)
    assert config.accel_redirect is None
    assert config.cache_max_size is None


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        ("homeserver.db", "synapse/homeserver.db"),
        ("data/hs.db", "synapse/data/hs.db"),
        ("../elsewhere/hs.db", "synapse/../elsewhere/hs.db"),
        ("/var/lib/synapse/hs.db", "/var/lib/synapse/hs.db"),
    ],
)
def test_sqlite_path_relative_to_the_config_directory(
    tmp_path: Path, database: str, expected: str
) -> None:
    config = load_hs(
        tmp_path,
        f"""
        database:
          name: sqlite3
          args:
            database: {database}
            cp_min: 1
            check_same_thread: false
        """,
    )
    assert config.database.engine == "sqlite3"
    assert config.database.args == {"database": str(tmp_path / expected)}


def test_synapse_working_directory(tmp_path: Path) -> None:
    own = write(
        tmp_path / "proxy.yaml",
        """
        synapse_url: http://127.0.0.1:8008
        synapse_working_directory: /srv/synapse
        """,
    )
    config = load(
        config_file=own,
        synapse_config=[hs_file(tmp_path, "database_path: data/hs.db\nmedia_store_path: media\n")],
        environ={},
    )
    assert config.database.args == {"database": "/srv/synapse/data/hs.db"}
    assert config.media_store_path == Path("/srv/synapse/media")
    assert config.cache_path == Path("/srv/synapse/media")


def test_absolute_media_store_path(tmp_path: Path) -> None:
    config = load_hs(tmp_path, "media_store_path: /data/media\n")
    assert config.media_store_path == Path("/data/media")


@pytest.mark.parametrize("name", ["psycopg2", "psycopg"])
def test_postgres_args_without_cp_keys(tmp_path: Path, name: str) -> None:
    config = load_hs(
        tmp_path,
        f"""
        database:
          name: {name}
          args:
            user: synapse
            password: secret
            database: synapse
            host: db.internal
            port: 5433
            sslmode: require
            cp_min: 5
            cp_max: 10
            cp_reconnect: true
        """,
    )
    assert config.database.engine == "psycopg2"
    assert config.database.args == {
        "user": "synapse",
        "password": "secret",
        "database": "synapse",
        "host": "db.internal",
        "port": 5433,
        "sslmode": "require",
    }


def test_databases_multi_form_picks_main(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        """
        databases:
          state_db:
            name: psycopg2
            data_stores: [state]
            args: {database: state, cp_min: 1}
          main_db:
            name: psycopg2
            data_stores: [main]
            args: {database: main, host: pg, cp_max: 3}
        """,
    )
    assert config.database.args == {"database": "main", "host": "pg"}


def test_databases_entry_without_data_stores_holds_main(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        """
        databases:
          only:
            name: sqlite3
            args: {database: multi.db}
        """,
    )
    assert config.database.args == {"database": str(tmp_path / "synapse" / "multi.db")}


def test_legacy_database_path(tmp_path: Path) -> None:
    config = load_hs(tmp_path, "database_path: legacy.db\n")
    assert config.database.engine == "sqlite3"
    assert config.database.args == {"database": str(tmp_path / "synapse" / "legacy.db")}


def test_database_path_ignored_with_postgres(tmp_path: Path) -> None:
    # Synapse logs "Ignoring 'database_path' setting: not using a sqlite3 database."
    config = load_hs(
        tmp_path,
        """
        database_path: legacy.db
        database: {name: psycopg2, args: {database: synapse}}
        """,
    )
    assert config.database.args == {"database": "synapse"}


def test_database_path_overrides_sqlite_database(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        """
        database_path: legacy.db
        database: {name: sqlite3, args: {database: other.db}}
        """,
    )
    assert config.database.args == {"database": str(tmp_path / "synapse" / "legacy.db")}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("database: {name: mysql, args: {}}\n", "database.name"),
        ("database: {name: sqlite3, args: {database: ':memory:'}}\n", "database.args.database"),
        ("database: {name: sqlite3, args: {}}\n", "database.args.database"),
        ("database: {name: sqlite3}\n", "database.args.database"),
        ("database: sqlite3\n", "database"),
        ("databases: [a, b]\n", "databases"),
        ("databases: {s: {name: psycopg2, data_stores: [state], args: {}}}\n", "databases"),
    ],
)
def test_bad_database(tmp_path: Path, text: str, key: str) -> None:
    hs = hs_file(tmp_path, text)
    error = config_error(synapse_config=[hs], overrides=URL, environ={})
    assert (error.source, error.key) == (str(hs), key)


@pytest.mark.parametrize(
    "text",
    [
        "databases: {main: oops}\n",
        "database: {name: sqlite3, args: oops}\n",
        f"media_storage_providers: [{{module: {S3_MODULE}, config: oops}}]\n",
    ],
)
def test_malformed_sections_are_config_errors(tmp_path: Path, text: str) -> None:
    config_error(synapse_config=[hs_file(tmp_path, text)], overrides=URL, environ={})


# --- S3 ----------------------------------------------------------------------------------

PROVIDERS = f"""
media_storage_providers:
  - module: file_system
    store_local: true
    store_synchronous: true
    config: {{directory: /mnt/backup}}
  - module: {S3_MODULE}
    store_local: true
    store_remote: false
    store_synchronous: true
    config:
      bucket: media
      prefix: synapse/
      endpoint_url: http://127.0.0.1:8333
      region_name: us-east-1
      access_key_id: AKID
      secret_access_key: SECRET
      storage_class: STANDARD_IA
      sse_customer_key: SSEKEY
      threadpool_size: 20
  - module: {S3_MODULE}
    store_remote: true
    config: {{bucket: second}}
"""


def test_s3_provider_is_picked_among_several(tmp_path: Path) -> None:
    config = load_hs(tmp_path, PROVIDERS)
    assert config.s3 == S3Config(
        bucket="media",
        prefix="synapse/",
        endpoint_url="http://127.0.0.1:8333",
        region_name="us-east-1",
        access_key_id="AKID",
        secret_access_key="SECRET",
        storage_class="STANDARD_IA",
        sse_customer_key="SSEKEY",
        store_local=True,
        store_remote=False,
        store_synchronous=True,
    )


def test_s3_flags_default_to_false(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path, f"media_storage_providers: [{{module: {S3_MODULE}, config: {{bucket: b}}}}]\n"
    )
    assert config.s3 is not None
    assert (config.s3.store_local, config.s3.store_remote, config.s3.store_synchronous) == (
        False,
        False,
        False,
    )
    assert (config.s3.prefix, config.s3.storage_class, config.s3.sse_customer_algo) == (
        "",
        "STANDARD",
        "AES256",
    )


def test_no_s3_provider(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path, "media_storage_providers: [{module: file_system, config: {directory: /x}}]\n"
    )
    assert config.s3 is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("media_storage_providers: {module: x}\n", "media_storage_providers"),
        (f"media_storage_providers: [{{module: {S3_MODULE}, config: {{}}}}]\n", "s3.bucket"),
        (
            f"media_storage_providers: [{{module: {S3_MODULE}, config: "
            "{bucket: b, storage_class: GLACIER}}]\n",
            "s3.storage_class",
        ),
    ],
)
def test_bad_s3_in_homeserver_yaml(tmp_path: Path, text: str, key: str) -> None:
    hs = hs_file(tmp_path, text)
    error = config_error(synapse_config=[hs], overrides=URL, environ={})
    assert (error.source, error.key) == (str(hs), key)


def test_numeric_access_key_id_like_the_provider(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        f"media_storage_providers: [{{module: {S3_MODULE}, "
        "config: {bucket: b, access_key_id: 12345}}]\n",
    )
    assert config.s3 is not None
    assert config.s3.access_key_id == "12345"


# --- own config, command line, environment -----------------------------------------------


def test_own_config_overrides_homeserver_yaml(tmp_path: Path) -> None:
    own = write(
        tmp_path / "proxy.yaml",
        """
        synapse_url: https://synapse.internal:8448
        media_store_path: /own/store
        max_upload_size: 100M
        enable_authenticated_media: false
        cache_path: /cache
        listen: 0.0.0.0:9000
        workers: 4
        accel_redirect: /_media_proxy_cache/
        cache_max_size: 10G
        auth_cache_ttl: 30
        log_format: json
        event_loop: uvloop
        database: {name: psycopg2, args: {database: own, cp_min: 2}}
        s3:
          prefix: own/
          addressing_style: virtual
          connect_timeout: 1.5
        """,
    )
    config = load(
        config_file=own,
        synapse_config=[hs_file(tmp_path, PROVIDERS + "max_upload_size: 10M\n")],
        environ={},
    )
    assert config.synapse_url == "https://synapse.internal:8448"
    assert config.media_store_path == Path("/own/store")
    assert config.max_upload_size == 100 * 1024**2
    assert config.enable_authenticated_media is False
    assert config.cache_path == Path("/cache")
    assert (config.listen_host, config.listen_port, config.workers) == ("0.0.0.0", 9000, 4)
    assert config.accel_redirect == "/_media_proxy_cache/"
    assert config.cache_max_size == 10 * 1024**3
    assert config.auth_cache_ttl == 30.0
    assert config.log_format == "json"
    assert config.event_loop == "uvloop"  # the default is asyncio
    assert config.database.engine == "psycopg2"
    assert config.database.args == {"database": "own"}
    assert config.s3 is not None
    assert config.s3.bucket == "media"  # from the provider entry
    assert config.s3.prefix == "own/"  # overridden
    assert config.s3.addressing_style == "virtual"
    assert config.s3.connect_timeout == 1.5
    assert config.s3.store_local is True  # provider flags kept
    assert config.sources == (str(own), str(tmp_path / "synapse" / "homeserver.yaml"))


def test_command_line_overrides_own_config(tmp_path: Path) -> None:
    own = write(
        tmp_path / "proxy.yaml", "synapse_url: http://a:1\nlisten: 127.0.0.1:1\nworkers: 2\n"
    )
    config = load(
        config_file=own,
        synapse_config=[hs_file(tmp_path)],
        overrides={"synapse_url": "http://b:2", "listen": None, "workers": 3, "cache_path": []},
        environ={},
    )
    assert config.synapse_url == "http://b:2"
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 1)  # None: unset
    assert config.workers == 3


def test_synapse_config_from_own_file(tmp_path: Path) -> None:
    hs = hs_file(tmp_path)
    for value in (str(hs), [str(hs)]):
        own = write(
            tmp_path / "proxy.yaml",
            json.dumps({"synapse_url": "http://x:1", "synapse_config": value}),
        )
        config = load(config_file=own, environ={})
        assert config.server_name == "example.org"
        assert config.synapse_config == (hs,)


def test_env_secrets_override_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = write(
        tmp_path / "proxy.yaml",
        """
        synapse_url: http://x:1
        s3: {secret_access_key: from-own-file}
        database: {name: psycopg2, args: {database: synapse, password: from-file}}
        """,
    )
    monkeypatch.setenv("MEDIA_PROXY_S3_ACCESS_KEY_ID", "from-os-environ")
    environ = {
        "MEDIA_PROXY_S3_SECRET_ACCESS_KEY": "env-secret",
        "MEDIA_PROXY_S3_SESSION_TOKEN": "env-session",
        "MEDIA_PROXY_S3_SSE_CUSTOMER_KEY": "env-sse",
        "MEDIA_PROXY_DATABASE_PASSWORD": "env-password",
    }
    config = load(config_file=own, synapse_config=[hs_file(tmp_path, PROVIDERS)], environ=environ)
    assert config.s3 is not None
    assert config.s3.secret_access_key == "env-secret"
    assert config.s3.session_token == "env-session"
    assert config.s3.sse_customer_key == "env-sse"
    assert config.s3.access_key_id == "AKID"  # `environ` given: os.environ is not read
    assert config.database.args["password"] == "env-password"


def test_env_is_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_SECRETS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MEDIA_PROXY_S3_ACCESS_KEY_ID", "from-os-environ")
    config = load(synapse_config=[hs_file(tmp_path, PROVIDERS)], overrides=URL)
    assert config.s3 is not None
    assert config.s3.access_key_id == "from-os-environ"


def test_database_password_env_is_for_postgres_only(tmp_path: Path) -> None:
    config = load_hs(tmp_path, environ={"MEDIA_PROXY_DATABASE_PASSWORD": "pw"})
    assert config.database.args == {"database": str(tmp_path / "synapse" / "homeserver.db")}


def test_local_storage_off_needs_a_cache_path(tmp_path: Path) -> None:
    hs = hs_file(tmp_path, "enable_local_media_storage: false\n")
    error = config_error(synapse_config=[hs], overrides=URL, environ={})
    assert (error.source, error.key) == ("", "cache_path")  # given nowhere
    config = load(
        synapse_config=[hs], overrides={**URL, "cache_path": str(tmp_path / "c")}, environ={}
    )
    assert config.enable_local_media_storage is False
    assert config.cache_path == tmp_path / "c"


def test_unknown_own_key_is_refused(tmp_path: Path) -> None:
    own = write(tmp_path / "proxy.yaml", "synapse_url: http://x:1\nlisten_port: 9000\n")
    error = config_error(config_file=own, synapse_config=[hs_file(tmp_path)], environ={})
    assert (error.source, error.key, error.problem) == (str(own), "listen_port", "unknown key")


def test_unknown_own_s3_key_is_refused(tmp_path: Path) -> None:
    own = write(tmp_path / "proxy.yaml", "synapse_url: http://x:1\ns3: {bucket: b, buckte: c}\n")
    error = config_error(config_file=own, synapse_config=[hs_file(tmp_path)], environ={})
    assert (error.source, error.key) == (str(own), "s3.buckte")


@pytest.mark.parametrize(
    ("own_text", "key"),
    [
        ("cache_max_size: big\n", "cache_max_size"),
        ("cache_max_size: -1\n", "cache_max_size"),
        ("s3_chunk_size: 1.5M\n", "s3_chunk_size"),
        ("max_upload_size: 50X\n", "max_upload_size"),
        ("listen: '8011'\n", "listen"),
        ("listen: 'host:'\n", "listen"),
        ("listen: 'host:0'\n", "listen"),
        ("listen: 'host:65536'\n", "listen"),
        ("listen: 'host:http'\n", "listen"),
        ("listen: ':8011'\n", "listen"),
        ("listen: '[]:8011'\n", "listen"),
        ("workers: 0\n", "workers"),
        ("workers: '2'\n", "workers"),
        ("auth_cache_ttl: -1\n", "auth_cache_ttl"),
        ("auth_cache_ttl: true\n", "auth_cache_ttl"),
        ("log_format: xml\n", "log_format"),
        ("event_loop: trio\n", "event_loop"),
        ("accel_redirect: /no-trailing-slash\n", "accel_redirect"),
        ("enable_authenticated_media: 'yes'\n", "enable_authenticated_media"),
        ("s3: [bucket]\n", "s3"),
        ("synapse_url: ftp://x\n", "synapse_url"),
        ("synapse_url: 127.0.0.1:8008\n", "synapse_url"),
        ("server_name: ''\n", "server_name"),
    ],
)
def test_bad_own_values(tmp_path: Path, own_text: str, key: str) -> None:
    own = write(tmp_path / "proxy.yaml", "synapse_url: http://x:1\n" + own_text)
    error = config_error(config_file=own, synapse_config=[hs_file(tmp_path)], environ={})
    assert (error.source, error.key) == (str(own), key)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_upload_size: 50X\n", "max_upload_size"),
        ("max_upload_size: true\n", "max_upload_size"),
        ("enable_local_media_storage: 1\n", "enable_local_media_storage"),
        ("media_store_path: [a]\n", "media_store_path"),
    ],
)
def test_bad_homeserver_values(tmp_path: Path, text: str, key: str) -> None:
    hs = hs_file(tmp_path, text)
    error = config_error(synapse_config=[hs], overrides=URL, environ={})
    assert (error.source, error.key) == (str(hs), key)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8011", ("127.0.0.1", 8011)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:9000", ("0.0.0.0", 9000)),
        ("[::]:9000", ("::", 9000)),
        ("example.org:65535", ("example.org", 65535)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value, source="s") == expected


def test_listen_without_a_host_is_refused_not_every_interface() -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(":8011", source="command line", key="--listen")
    assert str(info.value) == (
        "command line: --listen: expected HOST:PORT with a host, got ':8011': use"
        " 127.0.0.1:8011 (this machine only) or 0.0.0.0:8011 (every interface)"
    )


def test_missing_server_name(tmp_path: Path) -> None:
    hs = write(tmp_path / "homeserver.yaml", "media_store_path: /m\n")
    error = config_error(synapse_config=[hs], overrides=URL, environ={})
    assert (error.source, error.key) == (str(hs), "server_name")


def test_missing_synapse_url(tmp_path: Path) -> None:
    hs = hs_file(tmp_path)
    error = config_error(synapse_config=[hs], environ={})
    assert (
        str(error) == "synapse_url: required: set --synapse-url or synapse_url in the config file"
    )
    # offline commands do not need it
    assert load(synapse_config=[hs], environ={}, need_synapse_url=False).synapse_url == ""


def test_missing_synapse_config(tmp_path: Path) -> None:
    error = config_error(overrides=URL, environ={})
    assert error.key == "synapse_config"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read"),  # no such file
        ("- a\n- b\n", "expected a mapping at the top level"),
    ],
)
def test_unreadable_or_invalid_yaml(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "homeserver.yaml"
    if content is not None:
        path.write_text(content)
    error = config_error(synapse_config=[path], overrides=URL, environ={})
    assert (error.source, error.key) == (str(path), "synapse_config")
    assert error.problem.startswith(problem)
    assert "\n" not in str(error)
    # and the same for the proxy's own file
    own_error = config_error(config_file=path, synapse_config=[hs_file(tmp_path)], environ={})
    assert (own_error.source, own_error.key) == (str(path), "--config")
    assert own_error.problem.startswith(problem)


@pytest.mark.parametrize(
    ("content", "where", "problem"),
    [
        ("server_name: [unclosed\n", "2:1", "expected ',' or ']', but got '<stream end>'"),
        ("server_name: a\n  bad: indent\n", "2:6", "mapping values are not allowed here"),
        ("a: 1\nb: 2\n\tc: 3\n", "3:1", "found character '\\t' that cannot start any token"),
    ],
)
def test_invalid_yaml_names_line_and_column(
    tmp_path: Path, content: str, where: str, problem: str
) -> None:
    """file:line:column: message, the form editors and terminals jump to."""
    path = write(tmp_path / "homeserver.yaml", content)
    for error in (
        config_error(synapse_config=[path], overrides=URL, environ={}),
        config_error(config_file=path, synapse_config=[hs_file(tmp_path)], environ={}),
    ):
        assert str(error).startswith(f"{path}:{where}: not valid YAML: {problem}")
        assert "\n" not in str(error)


def test_own_config_that_is_a_directory(tmp_path: Path) -> None:
    error = config_error(config_file=tmp_path, synapse_config=[hs_file(tmp_path)], environ={})
    assert (error.source, error.key) == (str(tmp_path), "--config")
    assert error.problem == "cannot read: Is a directory"


def test_empty_yaml_file_is_an_empty_mapping(tmp_path: Path) -> None:
    own = write(tmp_path / "proxy.yaml", "")
    error = config_error(config_file=own, synapse_config=[hs_file(tmp_path)], environ={})
    assert error.key == "synapse_url"  # the file was read as {}, not refused


# --- config directories ------------------------------------------------------------------


def test_config_directories_merge_in_sorted_order(tmp_path: Path) -> None:
    base = write(
        tmp_path / "homeserver.yaml",
        """
        server_name: base.org
        media_store_path: /base/media
        max_upload_size: 1M
        database: {name: psycopg2, args: {database: synapse, host: pg}}
        """,
    )
    confd = tmp_path / "conf.d"
    # written in reverse order: the listing order must not matter
    write(confd / "README", "server_name: readme.org\n")
    write(confd / "30-c.yml", "server_name: yml.org\n")
    write(confd / "20-b.yaml", "server_name: b.org\n")
    write(
        confd / "10-a.yaml",
        """
        server_name: a.org
        media_store_path: /a/media
        database: {name: sqlite3, args: {database: a.db}}
        """,
    )
    write(confd / "00-empty.yaml", "")
    config = load(synapse_config=[base, confd], overrides=URL, environ={})
    assert config.server_name == "b.org"
    assert config.media_store_path == Path("/a/media")
    assert config.max_upload_size == 1024**2  # untouched keys survive
    # top-level sections are replaced, not merged: nothing of the postgres args is left
    assert config.database.engine == "sqlite3"
    assert config.database.args == {"database": str(tmp_path / "a.db")}
    assert config.synapse_config == (base, confd)


def test_config_directory_alone(tmp_path: Path) -> None:
    confd = tmp_path / "conf.d"
    write(confd / "b.yaml", "media_store_path: store\n")
    write(confd / "a.yaml", "server_name: a.org\nmedia_store_path: ignored\n")
    config = load(synapse_config=[confd], overrides=URL, environ={})
    assert config.server_name == "a.org"
    assert config.media_store_path == confd / "store"  # relative to the directory


@pytest.mark.parametrize("kind", ["subdirectory", "list"])
def test_config_directory_skips_what_synapse_skips(tmp_path: Path, kind: str) -> None:
    confd = tmp_path / "conf.d"
    write(confd / "a.yaml", "server_name: a.org\n")
    if kind == "subdirectory":
        (confd / "extra.yaml").mkdir()
    else:
        write(confd / "b.yaml", "- not\n- a mapping\n")
    assert load(synapse_config=[confd], overrides=URL, environ={}).server_name == "a.org"


# --- masked ------------------------------------------------------------------------------


def test_masked_hides_secrets(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        PROVIDERS + "database: {name: psycopg2, args: {database: synapse, password: pgpass}}\n",
        environ={"MEDIA_PROXY_S3_SESSION_TOKEN": "sessiontok"},
    )
    data = masked(config)
    text = json.dumps(data)  # plain data all the way down
    for secret in ("AKID", "SECRET", "SSEKEY", "sessiontok", "pgpass"):
        assert secret not in text
    assert data["s3"]["access_key_id"] == "***"
    assert data["s3"]["secret_access_key"] == "***"
    assert data["s3"]["session_token"] == "***"
    assert data["s3"]["sse_customer_key"] == "***"
    assert data["database"]["args"] == {"database": "synapse", "password": "***"}
    assert data["s3"]["bucket"] == "media"
    assert data["s3"]["endpoint_url"] == "http://127.0.0.1:8333"
    assert data["server_name"] == "example.org"
    assert data["media_store_path"] == str(tmp_path / "synapse" / "media_store")


def test_masked_leaves_unset_secrets_unset(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path, f"media_storage_providers: [{{module: {S3_MODULE}, config: {{bucket: b}}}}]\n"
    )
    data = masked(config)
    assert data["s3"]["secret_access_key"] is None
    assert data["s3"]["access_key_id"] is None


# --- parse_size --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1234, 1234),
        ("1234", 1234),
        ("1K", 1024),
        ("50M", 50 * 1024**2),
        ("2G", 2 * 1024**3),
        ("1T", 1024**4),
        ("50m", 50 * 1024**2),
        ("50MB", 50 * 1024**2),
        ("50MiB", 50 * 1024**2),
        (" 10 G ", 10 * 1024**3),
        ("0K", 0),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value, source="f", key="k") == expected


@pytest.mark.parametrize(
    "value", ["50X", "", "M", "1.5G", "-1", "-1M", "ten", "5 0M", -1, 1.5, True, False, None, []]
)
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_size(value, source="f.yaml", key="max_upload_size")
    assert (info.value.source, info.value.key) == ("f.yaml", "max_upload_size")


SIZES: list[Any] = [
    "0",
    "1",
    "1234",
    "1K",
    "50M",
    "2G",
    "1T",
    "10 M",
    " 10M",
    1234,
    0,
    "1_024K",
    "+50M",
]
_SIZE_SCRIPT = """
import json, sys
from synapse.config._base import Config
print(json.dumps([Config.parse_size(v) for v in json.load(sys.stdin)]))
"""


@pytest.fixture(scope="module")
def synapse_sizes() -> dict[str, int]:
    values = [v.values[0] if hasattr(v, "values") else v for v in SIZES]
    return {
        json.dumps(v): n for v, n in zip(values, run_synapse(_SIZE_SCRIPT, values), strict=True)
    }


@pytest.mark.parametrize("value", SIZES)
def test_parse_size_matches_synapse(value: object, synapse_sizes: dict[str, int]) -> None:
    """Every size Synapse accepts in homeserver.yaml means the same number of bytes here."""
    assert parse_size(value, source="f", key="k") == synapse_sizes[json.dumps(value)]


# --- the CLI's configuration errors ------------------------------------------------------


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_SECRETS:
        monkeypatch.delenv(name, raising=False)
    # a config that loads must not reconfigure the test session's logging
    monkeypatch.setattr(logs, "configure", lambda *args: None)


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.usefixtures("quiet_cli")
@pytest.mark.parametrize("command", [["check"], ["serve"], ["cache", "status"]])
def test_cli_unknown_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    own = write(tmp_path / "proxy.yaml", "synapse_url: http://x:1\nlisten_port: 1\n")
    hs = hs_file(tmp_path)
    assert cli.main([*command, "--config", str(own), "--synapse-config", str(hs)]) == 2
    assert one_line(capsys) == f"media-proxy: configuration error: {own}: listen_port: unknown key"


@pytest.mark.usefixtures("quiet_cli")
def test_cli_invalid_homeserver_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hs = write(tmp_path / "homeserver.yaml", "server_name: [unclosed\nx: 1\n")
    assert cli.main(["check", "--synapse-config", str(hs), "--synapse-url", "http://x:1"]) == 2
    assert one_line(capsys) == (
        f"media-proxy: configuration error: {hs}:2:2: not valid YAML: expected ',' or ']',"
        " but got ':' (while parsing a flow sequence)"
    )


@pytest.mark.usefixtures("quiet_cli")
def test_cli_missing_server_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hs = write(tmp_path / "homeserver.yaml", "media_store_path: /m\n")
    assert cli.main(["check", "--synapse-config", str(hs), "--synapse-url", "http://x:1"]) == 2
    assert one_line(capsys) == f"media-proxy: configuration error: {hs}: server_name: required"


@pytest.mark.usefixtures("quiet_cli")
def test_cli_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hs = tmp_path / "nope.yaml"
    assert cli.main(["serve", "--synapse-config", str(hs), "--synapse-url", "http://x:1"]) == 2
    line = one_line(capsys)
    assert line.startswith(f"media-proxy: configuration error: {hs}: synapse_config: cannot read")


@pytest.mark.usefixtures("quiet_cli")
def test_cli_bad_flag_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hs = hs_file(tmp_path)
    argv = ["serve", "--synapse-config", str(hs), "--synapse-url", "http://x:1"]
    assert cli.main([*argv, "--listen", "nowhere"]) == 2
    line = one_line(capsys)
    assert line.startswith("media-proxy: configuration error: command line: --listen: ")
    assert cli.main([*argv, "--listen", ":8011"]) == 2
    assert "--listen: expected HOST:PORT with a host, got ':8011'" in one_line(capsys)
    assert cli.main([*argv, "--cache-max-size", "lots"]) == 2
    assert "command line: --cache-max-size: expected a size" in one_line(capsys)
    assert cli.main([*argv, "--workers", "0"]) == 2
    assert one_line(capsys) == (
        "media-proxy: configuration error: command line: --workers: expected a number >= 1, got 0"
    )
    assert cli.main(["serve", "--synapse-config", str(hs), "--synapse-url", "ftp://x"]) == 2
    assert "command line: --synapse-url: expected an http(s) URL" in one_line(capsys)


@pytest.mark.usefixtures("quiet_cli")
def test_cli_flag_over_a_config_file_is_named_as_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = write(tmp_path / "proxy.yaml", "synapse_url: http://x:1\nworkers: 2\n")
    hs = hs_file(tmp_path)
    assert (
        cli.main(["serve", "--config", str(own), "--synapse-config", str(hs), "--workers", "0"])
        == 2
    )
    assert "command line: --workers: expected a number >= 1" in one_line(capsys)


@pytest.mark.usefixtures("quiet_cli")
def test_cli_missing_synapse_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hs = hs_file(tmp_path)
    assert cli.main(["check", "--synapse-config", str(hs)]) == 2
    assert one_line(capsys) == (
        "media-proxy: configuration error: synapse_url: required: set --synapse-url or"
        " synapse_url in the config file"
    )


@pytest.mark.usefixtures("quiet_cli")
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--max-size", "lots"], "media-proxy: --max-size: expected a size like 50M or 10G"),
        ([], "media-proxy: --max-size: required (or cache_max_size in config)"),
        (["--max-size", "1G", "--concurrency", "0"], "media-proxy: --concurrency: expected"),
        (["--max-size", "1G", "--min-age", "soon"], "media-proxy: --min-age: expected"),
    ],
)
def test_cli_cache_evict_flag_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], expected: str
) -> None:
    hs = hs_file(tmp_path)  # no synapse_url needed offline
    assert cli.main(["cache", "evict", "--synapse-config", str(hs), *flags]) == 2
    assert one_line(capsys).startswith(expected)


# --- S3 keys and secrets: lenient where the provider is, strict in our own file -----------


def test_provider_keys_unknown_to_us_are_ignored_like_the_provider(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        f"media_storage_providers: [{{module: {S3_MODULE}, "
        "config: {bucket: b, some_future_option: 1}}]\n",
    )
    assert config.s3 is not None and config.s3.bucket == "b"


def test_unknown_key_in_own_s3_section_is_refused(tmp_path: Path) -> None:
    own = write(tmp_path / "proxy.yaml", "s3: {bukcet: x}\n")
    error = config_error(
        config_file=own,
        synapse_config=[
            hs_file(
                tmp_path,
                f"media_storage_providers: [{{module: {S3_MODULE}, config: {{bucket: b}}}}]\n",
            )
        ],
        overrides=URL,
        environ={},
    )
    assert (error.source, error.key, error.problem) == (str(own), "s3.bukcet", "unknown key")


def test_empty_secret_variables_are_ignored(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path,
        f"media_storage_providers: [{{module: {S3_MODULE}, "
        "config: {bucket: b, session_token: t}}]\n",
        environ={"MEDIA_PROXY_S3_SESSION_TOKEN": ""},
    )
    assert config.s3.session_token == "t"


def test_s3_secret_variables_without_s3_do_not_invent_a_bucket(tmp_path: Path) -> None:
    config = load_hs(tmp_path, environ={"MEDIA_PROXY_S3_SECRET_ACCESS_KEY": "x"})
    assert config.s3 is None


def test_masked_hides_a_dsn(tmp_path: Path) -> None:
    config = load_hs(
        tmp_path, "database: {name: psycopg2, args: {dsn: 'postgresql://u:secret@h/db'}}\n"
    )
    assert "secret" not in json.dumps(masked(config))


def test_dynamic_thumbnails_is_read_from_homeserver_yaml(tmp_path: Path) -> None:
    assert load_hs(tmp_path).dynamic_thumbnails is False
    assert load_hs(tmp_path / "b", "dynamic_thumbnails: true\n").dynamic_thumbnails is True
    hs = hs_file(tmp_path / "c", "dynamic_thumbnails: sometimes\n")
    error = config_error(synapse_config=[hs], overrides=URL, environ={})
    assert (error.source, error.key) == (str(hs), "dynamic_thumbnails")


# --- the same configuration flags for every command ---------------------------------------

CONFIG_FLAGS = {
    "--config",
    "--synapse-config",
    "--synapse-url",
    "--listen",
    "--workers",
    "--cache-path",
    "--accel-redirect",
    "--cache-max-size",
    "--log-format",
}
CACHE_FLAGS = {"--config", "--synapse-config", "--cache-path", "--log-format"}
COMMANDS = [["serve"], ["check"], ["cache", "status"], ["cache", "upload"], ["cache", "evict"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_accepts_the_arguments_of_serve(tmp_path: Path, command: list[str]) -> None:
    """README: run `check` (and the cache commands) with the arguments of `serve`."""
    own = write(tmp_path / "proxy.yaml", "s3_chunk_size: 2M\n")
    args = cli.build_parser().parse_args(
        [
            *command,
            *("--config", str(own), "--synapse-config", str(hs_file(tmp_path))),
            *("--synapse-url", "http://127.0.0.1:8008", "--listen", "127.0.0.1:9000"),
            *("--workers", "2", "--cache-path", str(tmp_path / "cache")),
            *("--accel-redirect", "/_cache/", "--cache-max-size", "50G", "--log-format", "json"),
        ]
    )
    config = cli._load(args)
    assert config.cache_max_size == 50 * 1024**3
    assert (config.listen_host, config.listen_port, config.workers) == ("127.0.0.1", 9000, 2)
    assert (config.cache_path, config.accel_redirect) == (tmp_path / "cache", "/_cache/")
    assert (config.synapse_url, config.log_format) == ("http://127.0.0.1:8008", "json")
    assert config.s3_chunk_size == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["serve"], CONFIG_FLAGS),
        (["check"], CONFIG_FLAGS),  # it shows and checks what serve would run with
        (["cache", "status"], CACHE_FLAGS | {"--cache-max-size"}),  # reports the budget
        (["cache", "upload"], CACHE_FLAGS),
        (["cache", "evict"], CACHE_FLAGS),  # its own --max-size defaults to cache_max_size
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_help_lists_only_the_flags_a_command_uses(
    capsys: pytest.CaptureFixture[str], command: list[str], shown: set[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args([*command, "--help"])
    text = capsys.readouterr().out
    assert set(re.findall(r"--[a-z-]+", text)) & CONFIG_FLAGS == shown


@pytest.mark.parametrize(
    "argv",
    [["serve", "--workers", "many"], ["bogus"], ["cache"], ["serve", "--no-such-flag"]],
    ids=lambda v: " ".join(v),
)
def test_a_bad_command_line_is_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.build_parser().parse_args(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("media-proxy"), err
    assert "usage:" not in err


def test_serving_loop_is_pythons_own_by_default(tmp_path: Path) -> None:
    """uvloop served hits no faster here (benchmarks.hits): it is an option, not the default."""
    config = load(synapse_config=[hs_file(tmp_path)], overrides=URL, environ={})
    assert config.event_loop == "asyncio"


def test_one_worker_per_cpu_by_default(tmp_path: Path) -> None:
    config = load(synapse_config=[hs_file(tmp_path)], overrides=URL, environ={})
    assert config.workers == len(os.sched_getaffinity(0)) >= 1
