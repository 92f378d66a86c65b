"""Configuration: what Synapse's homeserver.yaml already says, plus the proxy's own keys.

An administrator points the proxy at homeserver.yaml and nothing else; every value can be
overridden by the proxy's own YAML file, then by environment variables (secrets), then by
command-line flags. A missing or bad value is a `ConfigError` naming the file and the key,
which the CLI prints as one line before exiting with status 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final, Literal

import yaml

S3_PROVIDER_MODULE: Final = "s3_storage_provider.S3StorageProviderBackend"
STORAGE_CLASSES: Final = ("STANDARD", "REDUCED_REDUNDANCY", "STANDARD_IA", "INTELLIGENT_TIERING")

# Secrets stay out of files and process listings when these are set.
ENV_SECRETS: Final = {
    "MEDIA_PROXY_S3_ACCESS_KEY_ID": ("s3", "access_key_id"),
    "MEDIA_PROXY_S3_SECRET_ACCESS_KEY": ("s3", "secret_access_key"),
    "MEDIA_PROXY_S3_SESSION_TOKEN": ("s3", "session_token"),
    "MEDIA_PROXY_S3_SSE_CUSTOMER_KEY": ("s3", "sse_customer_key"),
    "MEDIA_PROXY_DATABASE_PASSWORD": ("database", "password"),
}
SECRET_KEYS: Final = frozenset(
    {"access_key_id", "secret_access_key", "session_token", "sse_customer_key", "password", "dsn"}
)


class ConfigError(Exception):
    """A configuration value the proxy cannot run with.

    `source` is a file, "command line" (then `key` is the flag) or "" (a value given nowhere);
    `line` and `column` (1-based) place a YAML syntax error, as compilers and editors expect.
    """

    def __init__(
        self, source: str, key: str, problem: str, *, line: int = 0, column: int = 0
    ) -> None:
        where = f"{source}:{line}:{column}" if line else source
        super().__init__(": ".join(part for part in (where, key, problem) if part))
        self.source, self.key, self.problem = source, key, problem
        self.line, self.column = line, column


COMMAND_LINE: Final = "command line"


@dataclass(frozen=True)
class S3Config:
    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region_name: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    sse_customer_key: str | None = None
    sse_customer_algo: str = "AES256"
    storage_class: str = "STANDARD"
    # Garage and SeaweedFS want path-style; AWS accepts it too.
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    connect_timeout: float = 5.0
    # Also the longest a body may stall mid-stream before the fill is aborted.
    read_timeout: float = 15.0
    # The longest a serving-path GET may take to answer, retries included.
    timeout: float = 10.0
    # After this many failed GETs in a row, S3 is not asked for `breaker_cooldown` seconds.
    breaker_threshold: int = 5
    breaker_cooldown: float = 10.0
    max_pool_connections: int = 64
    # Synapse's provider copies: the local file may be the only copy when these are false.
    store_local: bool = False
    store_remote: bool = False
    store_synchronous: bool = False


@dataclass(frozen=True)
class DatabaseConfig:
    engine: Literal["sqlite3", "psycopg2"]
    # sqlite3: {"database": absolute path}; psycopg2: libpq arguments without Synapse's cp_*.
    args: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    server_name: str
    media_store_path: Path
    cache_path: Path
    database: DatabaseConfig
    synapse_url: str
    s3: S3Config | None = None
    enable_local_media_storage: bool = True
    enable_authenticated_media: bool = True
    dynamic_thumbnails: bool = False
    # Remote origins: None = federate with all; outside the whitelist 403, prevented 404.
    federation_domain_whitelist: tuple[str, ...] | None = None
    prevent_media_downloads_from: tuple[str, ...] = ()
    # Synapse's `rc_federation.concurrent`: federation media requests of one origin the proxy
    # answers at once (per worker); more go to Synapse, whose rate limiter then sees them.
    federation_concurrent: int = 3
    max_upload_size: int = 50 * 1024 * 1024
    synapse_config: tuple[Path, ...] = ()
    listen_host: str = "127.0.0.1"
    listen_port: int = 8011
    workers: int = 1
    # Prometheus metrics on their own HOST:PORT (every worker answers, sums across workers).
    metrics_listen: tuple[str, int] | None = None
    # Positive whoami answers are trusted this long: a logout or lock takes effect after it.
    auth_cache_ttl: float = 10.0
    auth_failure_ttl: float = 2.0
    auth_cache_size: int = 10_000
    # A quarantine, deletion or new upload is seen by the proxy within this many seconds.
    metadata_cache_ttl: float = 5.0
    metadata_cache_size: int = 50_000
    # A database lookup slower than this is undecidable: the request goes to Synapse.
    database_timeout: float = 5.0
    access_flush_interval: float = 60.0
    s3_chunk_size: int = 1024 * 1024
    # Single byte ranges on downloads (206/416, Accept-Ranges); false: Synapse's exact answers.
    ranges: bool = True
    # What a miss gets while S3 cannot answer: "error" (502/504 at once) or "synapse".
    s3_unavailable: Literal["error", "synapse"] = "error"
    # Fills (S3 GETs written back) one worker leads at once, and one client address starts.
    max_fills: int = 64
    max_fills_per_client: int = 8
    # A miss past either cap waits this long for a slot before its 429/503.
    fill_wait: float = 5.0
    # Pass-through: connecting (and waiting for a pooled connection), then each read.
    synapse_connect_timeout: float = 10.0
    synapse_read_timeout: float = 120.0
    synapse_max_connections: int = 256
    # On SIGTERM: stop accepting, give running downloads this long, then abort them.
    shutdown_grace: float = 10.0
    accel_redirect: str | None = None
    cache_max_size: int | None = None
    # Background eviction (serve): files younger than this are never evicted; one pass per
    # interval.
    cache_min_age: float = 86400.0
    cache_evict_interval: float = 60.0
    # Background `s3 prune` (serve, off by default): one pass per interval, in one worker.
    s3_prune_interval: float | None = None
    s3_prune_min_age: float = 7 * 86400.0
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: str = "info"
    # The serving workers' event loop: Python's own, or uvloop (measured no faster here).
    event_loop: Literal["uvloop", "asyncio"] = "asyncio"
    sources: tuple[str, ...] = field(default=(), compare=False)


_SIZE: Final = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_SIZE_FACTORS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(value: object, *, source: str, key: str) -> int:
    """Bytes from an int or "50M"-style string: K/M/G/T are powers of 1024 and the number is
    read with int(), exactly as Synapse reads sizes in homeserver.yaml."""
    if isinstance(value, bool):
        raise ConfigError(source, key, f"expected a size like 50M, got {value!r}")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and value:
        number, factor = value, 1
        if value[-1].upper() in _SIZE_FACTORS and value[-1].strip():
            number, factor = value[:-1], _SIZE_FACTORS[value[-1].upper()]
        try:
            size = int(number) * factor
        except ValueError:
            size = -1
        if size >= 0:
            return size
        match = _SIZE.match(value)  # also "10 GiB", "50mb" in media-proxy's own keys
        if match is not None:
            return int(match[1]) * _SIZE_FACTORS[match[2].upper()]
    raise ConfigError(source, key, f"expected a size like 50M or 10G, got {value!r}")


_DURATION: Final = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)?\s*$", re.IGNORECASE)
_DURATION_FACTORS: Final = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: object, *, source: str, key: str) -> float:
    """Seconds from a number or "30s", "15m" (minutes), "12h", "1d", "2w"."""
    if isinstance(value, bool):
        raise ConfigError(source, key, f"expected a duration like 12h or 1d, got {value!r}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(source, key, f"expected a duration like 30m, 12h or 1d, got {value!r}")
    return float(match[1]) * _DURATION_FACTORS[(match[2] or "").lower()]


def parse_listen(value: str, *, source: str, key: str = "listen") -> tuple[str, int]:
    """HOST:PORT with an explicit host: `:8011` would quietly mean every interface."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(source, key, f"expected HOST:PORT, got {value!r}")
    if not host.strip("[]"):
        raise ConfigError(
            source,
            key,
            f"expected HOST:PORT with a host, got {value!r}: use 127.0.0.1:{port} (this"
            f" machine only) or 0.0.0.0:{port} (every interface)",
        )
    return host.strip("[]"), int(port)


_NOT_A_MAPPING: Final = "expected a mapping at the top level"


def _load_yaml(path: Path, *, key: str) -> dict[str, Any]:
    try:
        with path.open() as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(str(path), key, f"cannot read: {e.strerror}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = (e.problem or "syntax error") + (f" ({e.context})" if e.context else "")
        if mark is None:
            raise ConfigError(str(path), key, f"not valid YAML: {problem}") from None
        raise ConfigError(
            str(path), "", f"not valid YAML: {problem}", line=mark.line + 1, column=mark.column + 1
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(str(path), key, f"not valid YAML: {e}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), key, _NOT_A_MAPPING)
    return data


def read_synapse_config(paths: Sequence[Path]) -> dict[str, Any]:
    """Merge Synapse config files and directories the way Synapse does (top-level update).

    In a directory, like Synapse, only `*.yaml` files holding a mapping count.
    """
    merged: dict[str, Any] = {}
    for path in paths:
        if path.is_dir():
            for file in sorted(p for p in path.iterdir() if p.suffix == ".yaml" and p.is_file()):
                try:
                    merged.update(_load_yaml(file, key="synapse_config"))
                except ConfigError as e:
                    if e.problem != _NOT_A_MAPPING:
                        raise
        else:
            merged.update(_load_yaml(path, key="synapse_config"))
    return merged


class _Reader:
    """Typed access to one mapping, with errors that name the file and the key."""

    def __init__(
        self,
        data: Mapping[str, Any],
        source: str,
        prefix: str = "",
        flags: Mapping[str, str] | None = None,
    ) -> None:
        self.data, self.source, self.prefix = data, source, prefix
        self.flags = flags or {}  # keys given on the command line -> their flag

    def error(self, key: str, problem: str) -> ConfigError:
        if key in self.flags:
            return ConfigError(COMMAND_LINE, self.flags[key], problem)
        return ConfigError(self.source, self.prefix + key, problem)

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.error(key, f"expected a string, got {value!r}")
        return value

    def flag(self, key: str, default: bool) -> bool:
        value = self.data.get(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {value!r}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self.error(key, f"expected a number >= {minimum}, got {value!r}")
        return float(value)


def _synapse_database(hs: Mapping[str, Any], source: str, workdir: Path) -> DatabaseConfig:
    r = _Reader(hs, source)
    db = hs.get("database")
    if "databases" in hs:
        dbs = hs["databases"]
        if not isinstance(dbs, dict):
            raise r.error("databases", "expected a mapping of database names")
        if not all(isinstance(d, dict) for d in dbs.values()):
            raise r.error("databases", "expected a mapping per database")
        mains = [d for d in dbs.values() if "main" in d.get("data_stores", ["main"])]
        if not mains:
            raise r.error("databases", "no database holds the 'main' data store")
        db = mains[0]
    elif db is None:
        db = {"name": "sqlite3", "args": {"database": hs.get("database_path", "homeserver.db")}}
    if not isinstance(db, dict):
        raise r.error("database", "expected a mapping with 'name' and 'args'")
    name = db.get("name", "sqlite3")
    if not isinstance(db.get("args") or {}, dict):
        raise r.error("database.args", "expected a mapping")
    args = dict(db.get("args") or {})
    if name == "sqlite3":
        # Synapse lets a top-level database_path replace the sqlite3 file of `database:`.
        path = hs.get("database_path") or args.get("database")
        if not isinstance(path, str) or path == ":memory:":
            raise r.error("database.args.database", f"expected a database file, got {path!r}")
        return DatabaseConfig("sqlite3", {"database": str(workdir / path)})
    if name in ("psycopg2", "psycopg"):
        return DatabaseConfig(
            "psycopg2", {k: v for k, v in args.items() if not k.startswith("cp_")}
        )
    raise r.error("database.name", f"expected sqlite3 or psycopg2, got {name!r}")


def _synapse_s3(hs: Mapping[str, Any], source: str) -> dict[str, Any] | None:
    providers = hs.get("media_storage_providers") or []
    if not isinstance(providers, list):
        raise ConfigError(source, "media_storage_providers", "expected a list")
    for entry in providers:
        if isinstance(entry, dict) and entry.get("module") == S3_PROVIDER_MODULE:
            if not isinstance(entry.get("config") or {}, dict):
                raise ConfigError(source, "media_storage_providers.config", "expected a mapping")
            s3 = dict(entry.get("config") or {})
            for key in ("access_key_id", "region_name"):  # the provider str()s these
                if isinstance(s3.get(key), int | float) and not isinstance(s3.get(key), bool):
                    s3[key] = str(s3[key])
            for flag in ("store_local", "store_remote", "store_synchronous"):
                s3[flag] = bool(entry.get(flag, False))
            return s3
    return None


def _build_s3(values: Mapping[str, Any], source: str) -> S3Config:
    r = _Reader(values, source, "s3.")
    bucket = r.text("bucket")
    if not bucket:
        raise r.error("bucket", "required")
    storage_class = r.text("storage_class", "STANDARD") or "STANDARD"
    if storage_class not in STORAGE_CLASSES:
        raise r.error("storage_class", f"expected one of {', '.join(STORAGE_CLASSES)}")
    style = r.text("addressing_style", "path")
    if style not in ("path", "virtual", "auto"):
        raise r.error("addressing_style", f"expected path, virtual or auto, got {style!r}")
    return S3Config(
        bucket=bucket,
        prefix=r.text("prefix", "") or "",
        endpoint_url=r.text("endpoint_url"),
        region_name=r.text("region_name"),
        access_key_id=r.text("access_key_id"),
        secret_access_key=r.text("secret_access_key"),
        session_token=r.text("session_token"),
        sse_customer_key=r.text("sse_customer_key"),
        sse_customer_algo=r.text("sse_customer_algo", "AES256") or "AES256",
        storage_class=storage_class,
        addressing_style=style,  # type: ignore[arg-type]
        connect_timeout=r.number("connect_timeout", 5.0),
        read_timeout=r.number("read_timeout", 15.0),
        timeout=r.number("timeout", 10.0),
        breaker_threshold=int(r.number("breaker_threshold", 5, minimum=1)),
        breaker_cooldown=r.number("breaker_cooldown", 10.0),
        max_pool_connections=int(r.number("max_pool_connections", 64, minimum=1)),
        store_local=r.flag("store_local", False),
        store_remote=r.flag("store_remote", False),
        store_synchronous=r.flag("store_synchronous", False),
    )


_OWN_KEYS: Final = frozenset(
    {
        "synapse_config",
        "synapse_url",
        "synapse_working_directory",
        "listen",
        "workers",
        "metrics_listen",
        "cache_path",
        "accel_redirect",
        "cache_max_size",
        "cache_min_age",
        "cache_evict_interval",
        "s3_prune_interval",
        "s3_prune_min_age",
        "auth_cache_ttl",
        "auth_failure_ttl",
        "auth_cache_size",
        "metadata_cache_ttl",
        "metadata_cache_size",
        "database_timeout",
        "access_flush_interval",
        "s3_chunk_size",
        "ranges",
        "s3_unavailable",
        "max_fills",
        "max_fills_per_client",
        "fill_wait",
        "synapse_connect_timeout",
        "synapse_read_timeout",
        "synapse_max_connections",
        "shutdown_grace",
        "log_format",
        "log_level",
        "event_loop",
        "s3",
        "database",
        "server_name",
        "media_store_path",
        "enable_local_media_storage",
        "enable_authenticated_media",
        "dynamic_thumbnails",
        "federation_domain_whitelist",
        "prevent_media_downloads_from",
        "max_upload_size",
    }
)


def default_workers() -> int:
    """One serving worker per CPU this process may run on (its affinity, as a cpuset or
    `taskset` gives it): a worker is one Python thread of work."""
    return max(1, len(os.sched_getaffinity(0)))


def load(
    *,
    config_file: Path | None = None,
    synapse_config: Sequence[Path] = (),
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    need_synapse_url: bool = True,
) -> Config:
    """Build the effective configuration; `overrides` are command-line values (None = unset)."""
    environ = os.environ if environ is None else environ
    own: dict[str, Any] = _load_yaml(config_file, key="--config") if config_file else {}
    own_src = str(config_file) if config_file else ""
    for key in own:
        if key not in _OWN_KEYS:
            raise ConfigError(own_src, key, "unknown key")
    cli = {k: v for k, v in (overrides or {}).items() if v is not None and v != []}
    own.update(cli)
    flags = {key: "--" + key.replace("_", "-") for key in cli}

    def origin(key: str) -> tuple[str, str]:
        """Where `own[key]` came from, for errors: a flag, or the config file's key."""
        return (COMMAND_LINE, flags[key]) if key in flags else (own_src, key)

    hs_paths = [Path(p) for p in synapse_config] or [
        Path(p) for p in _as_list(own.get("synapse_config"), own_src)
    ]
    if not hs_paths:
        raise ConfigError(own_src, "synapse_config", "required (--synapse-config PATH)")
    hs_src = str(hs_paths[0])
    hs = read_synapse_config(hs_paths)
    hs_dir = hs_paths[0].parent if not hs_paths[0].is_dir() else hs_paths[0]
    workdir = Path(own.get("synapse_working_directory") or hs_dir).absolute()

    def pick(key: str, default: Any = None) -> tuple[Any, str]:
        if key in own:
            return own[key], own_src
        if key in hs:
            return hs[key], hs_src
        return default, hs_src

    server_name, src = pick("server_name")
    if not isinstance(server_name, str) or not server_name:
        raise ConfigError(src, "server_name", "required")
    store_value, src = pick("media_store_path", "media_store")
    if not isinstance(store_value, str):
        raise ConfigError(src, "media_store_path", f"expected a path, got {store_value!r}")
    media_store = workdir / store_value
    enable_local, src = pick("enable_local_media_storage", True)
    auth_media, src2 = pick("enable_authenticated_media", True)
    dynamic, src3 = pick("dynamic_thumbnails", False)
    for key, value, where in (
        ("enable_local_media_storage", enable_local, src),
        ("enable_authenticated_media", auth_media, src2),
        ("dynamic_thumbnails", dynamic, src3),
    ):
        if not isinstance(value, bool):
            raise ConfigError(where, key, f"expected true or false, got {value!r}")
    whitelist_value, src = pick("federation_domain_whitelist")
    whitelist = (
        None
        if whitelist_value is None
        else _server_names(whitelist_value, src, "federation_domain_whitelist")
    )
    prevented_value, src = pick("prevent_media_downloads_from")
    prevented = _server_names(prevented_value or [], src, "prevent_media_downloads_from")
    federation_concurrent = _federation_concurrent(hs, hs_src)
    max_upload, src = pick("max_upload_size", "50M")
    max_upload_size = parse_size(max_upload, source=src, key="max_upload_size")

    if "database" in own:
        if not isinstance(own["database"], dict):
            raise ConfigError(own_src, "database", "expected a mapping with 'name' and 'args'")
        database = _synapse_database({"database": own["database"]}, own_src, workdir)
    else:
        database = _synapse_database(hs, hs_src, workdir)
    password = environ.get("MEDIA_PROXY_DATABASE_PASSWORD")
    if password and database.engine == "psycopg2":
        database = replace(database, args={**database.args, "password": password})

    s3_values = _synapse_s3(hs, hs_src)
    own_s3 = own.get("s3")
    if own_s3 is not None and not isinstance(own_s3, dict):
        raise ConfigError(own_src, "s3", "expected a mapping")
    if own_s3:
        # The provider ignores keys it does not know; a typo in our own file is an error.
        unknown = set(own_s3) - {f.name for f in fields(S3Config)}
        if unknown:
            raise ConfigError(own_src, f"s3.{sorted(unknown)[0]}", "unknown key")
        s3_values = {**(s3_values or {}), **own_s3}
    for env, (_, key) in ENV_SECRETS.items():
        if environ.get(env) and key != "password" and s3_values:
            s3_values = {**s3_values, key: environ[env]}
    s3 = _build_s3(s3_values, own_src if own_s3 else hs_src) if s3_values else None

    cache_value = own.get("cache_path")
    if cache_value is None:
        if not enable_local:
            raise ConfigError(
                own_src, "cache_path", "required when enable_local_media_storage is false"
            )
        cache_path = media_store
    else:
        cache_path = Path(str(cache_value)).absolute()

    synapse_url = own.get("synapse_url")
    if synapse_url is None and not need_synapse_url:
        synapse_url = ""  # offline commands (`cache ...`) never talk to Synapse
    elif synapse_url is None:
        raise ConfigError(
            own_src, "synapse_url", "required: set --synapse-url or synapse_url in the config file"
        )
    elif not isinstance(synapse_url, str) or not re.match(r"^https?://", synapse_url):
        raise ConfigError(*origin("synapse_url"), f"expected an http(s) URL, got {synapse_url!r}")
    listen_src, listen_key = origin("listen")
    host, port = parse_listen(
        str(own.get("listen", "127.0.0.1:8011")), source=listen_src, key=listen_key
    )
    r = _Reader(own, own_src, flags=flags)
    workers = int(r.number("workers", default_workers(), minimum=1))
    metrics_listen: tuple[str, int] | None = None
    if own.get("metrics_listen") is not None:
        m_src, m_key = origin("metrics_listen")
        metrics_listen = parse_listen(str(own["metrics_listen"]), source=m_src, key=m_key)
        if metrics_listen[1] == port:
            raise ConfigError(m_src, m_key, f"must differ from listen's port {port}")
    log_format = r.text("log_format", "auto")
    if log_format not in ("auto", "json", "console"):
        raise r.error("log_format", f"expected auto, json or console, got {log_format!r}")
    event_loop = r.text("event_loop", "asyncio")
    if event_loop not in ("uvloop", "asyncio"):
        raise r.error("event_loop", f"expected uvloop or asyncio, got {event_loop!r}")
    accel = r.text("accel_redirect")
    if accel and not (accel.startswith("/") and accel.endswith("/")):
        raise r.error(
            "accel_redirect", f"expected a location like /_media_proxy_cache/, got {accel!r}"
        )
    max_size_src, max_size_key = origin("cache_max_size")
    max_size = own.get("cache_max_size")
    return Config(
        server_name=server_name,
        media_store_path=media_store,
        cache_path=cache_path,
        database=database,
        synapse_url=synapse_url.rstrip("/"),
        s3=s3,
        enable_local_media_storage=enable_local,
        enable_authenticated_media=auth_media,
        dynamic_thumbnails=dynamic,
        federation_domain_whitelist=whitelist,
        prevent_media_downloads_from=prevented,
        federation_concurrent=federation_concurrent,
        max_upload_size=max_upload_size,
        synapse_config=tuple(p.absolute() for p in hs_paths),
        listen_host=host,
        listen_port=port,
        workers=workers,
        metrics_listen=metrics_listen,
        auth_cache_ttl=r.number("auth_cache_ttl", 10.0),
        auth_failure_ttl=r.number("auth_failure_ttl", 2.0),
        auth_cache_size=int(r.number("auth_cache_size", 10_000, minimum=1)),
        metadata_cache_ttl=r.number("metadata_cache_ttl", 5.0),
        metadata_cache_size=int(r.number("metadata_cache_size", 50_000, minimum=1)),
        database_timeout=r.number("database_timeout", 5.0, minimum=0.05),
        access_flush_interval=r.number("access_flush_interval", 60.0, minimum=0.1),
        s3_chunk_size=parse_size(
            own.get("s3_chunk_size", "1M"), source=own_src, key="s3_chunk_size"
        ),
        s3_unavailable=_s3_unavailable(r),
        ranges=r.flag("ranges", True),
        max_fills=int(r.number("max_fills", 64, minimum=1)),
        max_fills_per_client=int(r.number("max_fills_per_client", 8, minimum=1)),
        fill_wait=r.number("fill_wait", 5.0),
        synapse_connect_timeout=r.number("synapse_connect_timeout", 10.0, minimum=0.1),
        synapse_read_timeout=r.number("synapse_read_timeout", 120.0, minimum=0.1),
        synapse_max_connections=int(r.number("synapse_max_connections", 256, minimum=1)),
        shutdown_grace=r.number("shutdown_grace", 10.0),
        accel_redirect=accel or None,
        cache_max_size=None
        if max_size is None
        else parse_size(max_size, source=max_size_src, key=max_size_key),
        cache_min_age=parse_duration(
            own.get("cache_min_age", "1d"), source=own_src, key="cache_min_age"
        ),
        cache_evict_interval=max(
            0.1,
            parse_duration(
                own.get("cache_evict_interval", 60), source=own_src, key="cache_evict_interval"
            ),
        ),
        s3_prune_interval=None
        if own.get("s3_prune_interval") is None
        else max(
            1.0,
            parse_duration(own["s3_prune_interval"], source=own_src, key="s3_prune_interval"),
        ),
        s3_prune_min_age=parse_duration(
            own.get("s3_prune_min_age", "7d"), source=own_src, key="s3_prune_min_age"
        ),
        log_format=log_format,  # type: ignore[arg-type]
        event_loop=event_loop,  # type: ignore[arg-type]
        log_level=r.text("log_level", "info") or "info",
        sources=(own_src, hs_src),
    )


def _s3_unavailable(r: _Reader) -> Literal["error", "synapse"]:
    value = r.text("s3_unavailable", "error")
    if value not in ("error", "synapse"):
        raise r.error("s3_unavailable", f"expected error or synapse, got {value!r}")
    return "synapse" if value == "synapse" else "error"


def _federation_concurrent(hs: Mapping[str, Any], source: str) -> int:
    """`rc_federation.concurrent` (legacy `federation_rc_concurrent`), as Synapse reads it."""
    if "rc_federation" in hs:
        section = hs["rc_federation"]
        key = "rc_federation.concurrent"
        value = section.get("concurrent", 3) if isinstance(section, dict) else None
    else:
        key = "federation_rc_concurrent"
        value = hs.get(key)
        value = 3 if value is None else value
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(source, key, f"expected an integer, got {value!r}")
    return value


def _server_names(value: Any, source: str, key: str) -> tuple[str, ...]:
    """A list of server names, compared by Synapse exactly (case and port included)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(source, key, f"expected a list of server names, got {value!r}")
    return tuple(value)


def _as_list(value: Any, source: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ConfigError(
        source, "synapse_config", f"expected a path or a list of paths, got {value!r}"
    )


def masked(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data, secrets replaced by '***'."""

    def walk(value: Any, key: str = "") -> Any:
        if key in SECRET_KEYS and value:
            return "***"
        if hasattr(value, "__dataclass_fields__"):
            return {f.name: walk(getattr(value, f.name), f.name) for f in fields(value)}
        if isinstance(value, Mapping):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [walk(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    result: dict[str, Any] = walk(config)
    return result
