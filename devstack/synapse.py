"""A real Synapse on loopback, configured the way media-proxy expects to find it in production.

Synapse runs from its own virtualenv (its dependencies clash with ours), with the S3 storage
provider pointing at the dev stack's SeaweedFS, and with rate limits lifted so that tests and
benchmarks measure media serving rather than Synapse's throttling.

With ``federation=True`` it also federates over loopback: a TLS listener (self-signed
certificate made here) for the federation and key APIs, a server name ``127.0.0.1:<that
port>`` (an IP literal with a port, which Synapse connects to directly: no DNS, SRV or
.well-known), certificates not verified and 127.0.0.1 allowed as a destination.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from devstack.postgres import PostgresDatabase
from devstack.procs import LOOPBACK, ManagedProcess, Part, StartupError, free_port
from devstack.seaweed import S3Config

REPO_ROOT: Final = Path(__file__).resolve().parents[1]
DEFAULT_SERVER_NAME: Final = "devstack.test"
_DIRECT: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_UNLIMITED: Final = {"per_second": 1_000_000, "burst_count": 1_000_000}
# Every rate limit a test, demo or benchmark could run into, lifted.
RELAXED_RATE_LIMITS: Final[dict[str, Any]] = {
    "rc_message": _UNLIMITED,
    "rc_registration": _UNLIMITED,
    "rc_registration_token_validity": _UNLIMITED,
    "rc_login": {"address": _UNLIMITED, "account": _UNLIMITED, "failed_attempts": _UNLIMITED},
    "rc_admin_redaction": _UNLIMITED,
    "rc_joins": {"local": _UNLIMITED, "remote": _UNLIMITED},
    "rc_joins_per_room": _UNLIMITED,
    "rc_3pid_validation": _UNLIMITED,
    "rc_invites": {"per_room": _UNLIMITED, "per_user": _UNLIMITED, "per_issuer": _UNLIMITED},
    "rc_third_party_invite": _UNLIMITED,
    "rc_media_create": _UNLIMITED,
    "rc_presence": {"per_user": _UNLIMITED},
    "rc_delayed_event_mgmt": _UNLIMITED,
    "rc_room_creation": _UNLIMITED,
    "rc_reports": _UNLIMITED,
    "rc_user_directory": _UNLIMITED,
    "rc_profile": _UNLIMITED,
    "rc_key_requests": _UNLIMITED,
    "rc_federation": {
        "window_size": 1000,
        "sleep_limit": 1_000_000,
        "sleep_delay": 0,
        "reject_limit": 1_000_000,
        "concurrent": 1_000_000,
    },
    "remote_media_download_per_second": "1000G",
    "remote_media_download_burst_count": "1000G",
}


@dataclass(frozen=True)
class SqliteDatabase:
    """Synapse on SQLite: one file."""

    path: Path


Database = SqliteDatabase | PostgresDatabase


class SynapseError(RuntimeError):
    """Synapse answered an API call with an error status."""

    def __init__(self, status: int, body: Any, what: str) -> None:
        super().__init__(f"{what}: HTTP {status}: {body}")
        self.status = status
        self.body = body


def synapse_python() -> str:
    """Synapse's interpreter: $MEDIA_PROXY_SYNAPSE_PYTHON, else <repo>/.venv-synapse/bin/python."""
    return os.environ.get(
        "MEDIA_PROXY_SYNAPSE_PYTHON", str(REPO_ROOT / ".venv-synapse" / "bin" / "python")
    )


def _log_config(level: str) -> dict[str, Any]:
    # To stderr, which ManagedProcess sends to synapse.log: a failed start quotes it.
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                "%(request)s - %(message)s"
            }
        },
        "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "precise"}},
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": level, "handlers": ["console"]},
        "disable_existing_loggers": False,
    }


class Synapse(Part):
    """One Synapse homeserver: generated config, merged overrides, start/stop, a few API calls.

    ``extra_config`` replaces whole top-level keys of homeserver.yaml after everything else.
    """

    start_timeout = 120.0  # the first start creates the whole schema

    def __init__(
        self,
        workdir: Path,
        *,
        server_name: str = DEFAULT_SERVER_NAME,
        database: Database | None = None,
        s3: S3Config | None = None,
        port: int | None = None,
        extra_config: Mapping[str, Any] | None = None,
        log_level: str = "INFO",
        python: str | None = None,
        federation: bool = False,
    ) -> None:
        self.workdir = workdir.resolve()
        # The TLS port other homeservers reach this one on (None: no federation listener).
        self.federation_port = free_port() if federation else None
        if federation and server_name == DEFAULT_SERVER_NAME:
            server_name = f"{LOOPBACK}:{self.federation_port}"
        self.server_name = server_name
        self.database: Database = database or SqliteDatabase(self.workdir / "homeserver.db")
        self.s3 = s3
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.config_path = self.workdir / "homeserver.yaml"
        self.media_store_path = self.workdir / "media_store"
        self.log_path = self.workdir / "synapse.log"
        self.extra_config = dict(extra_config or {})
        self.log_level = log_level
        self.python = python or synapse_python()
        self.registration_shared_secret = secrets.token_hex(16)
        self.config: dict[str, Any] = {}
        self.process: ManagedProcess | None = None

    # --- configuration ------------------------------------------------------------------

    def _database_config(self) -> dict[str, Any]:
        db = self.database
        if isinstance(db, SqliteDatabase):
            return {"name": "sqlite3", "args": {"database": str(db.path.resolve())}}
        args: dict[str, Any] = {
            "user": db.user,
            "host": db.host,
            "port": db.port,
            "database": db.database,
            "cp_min": 1,
            "cp_max": 5,
        }
        if db.password is not None:
            args["password"] = db.password
        return {"name": "psycopg2", "args": args}

    def _storage_providers(self) -> list[dict[str, Any]]:
        if self.s3 is None:
            return []
        config: dict[str, Any] = {
            "bucket": self.s3.bucket,
            "endpoint_url": self.s3.endpoint_url,
            "access_key_id": self.s3.access_key,
            "secret_access_key": self.s3.secret_key,
            "region_name": self.s3.region,
        }
        if self.s3.prefix:
            config["prefix"] = self.s3.prefix
        return [
            {
                "module": "s3_storage_provider.S3StorageProviderBackend",
                "store_local": True,
                "store_remote": True,
                "store_synchronous": True,
                "config": config,
            }
        ]

    def _federation_config(self) -> dict[str, Any]:
        """The TLS listener and the settings that let two loopback homeservers federate."""
        if self.federation_port is None:
            return {}
        cert, key = self.workdir / "tls.crt", self.workdir / "tls.key"
        if not cert.exists():
            _self_signed_certificate(self.python, cert, key)
        return {
            "tls_certificate_path": str(cert),
            "tls_private_key_path": str(key),
            "federation_verify_certificates": False,
            # Synapse refuses private addresses as destinations unless allowed. The whitelist
            # does not reach IP-literal server names (its BlocklistingAgentWrapper is given
            # the blocklist only), hence an empty federation blocklist.
            "ip_range_whitelist": [LOOPBACK],
            "federation_ip_range_blacklist": [],
        }

    def _listeners(self) -> list[dict[str, Any]]:
        listeners: list[dict[str, Any]] = [
            {
                "port": self.port,
                "bind_addresses": [LOOPBACK],
                "type": "http",
                "tls": False,
                "x_forwarded": True,
                "resources": [{"names": ["client", "federation"], "compress": False}],
            }
        ]
        if self.federation_port is not None:
            listeners.append(
                {
                    "port": self.federation_port,
                    "bind_addresses": [LOOPBACK],
                    "type": "http",
                    "tls": True,
                    "resources": [{"names": ["federation"], "compress": False}],
                }
            )
        return listeners

    def write_config(self) -> dict[str, Any]:
        """Generate homeserver.yaml once (keys, secrets), then (re)write the keys we control."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            generated = subprocess.run(
                [
                    self.python,
                    "-m",
                    "synapse.app.homeserver",
                    "--server-name",
                    self.server_name,
                    "--config-path",
                    str(self.config_path),
                    "--data-directory",
                    str(self.workdir),
                    "--generate-config",
                    "--report-stats=no",
                ],
                cwd=self.workdir,
                check=False,
                capture_output=True,
                text=True,
            )
            if generated.returncode != 0:
                raise StartupError(
                    f"Synapse --generate-config with {self.python} failed "
                    f"({generated.returncode}):\n{generated.stdout}{generated.stderr}"
                )
        config: dict[str, Any] = yaml.safe_load(self.config_path.read_text())
        log_config = self.workdir / "log.config"
        log_config.write_text(yaml.safe_dump(_log_config(self.log_level)))
        config.update(
            {
                "server_name": self.server_name,
                "pid_file": str(self.workdir / "homeserver.pid"),
                "listeners": self._listeners(),
                "database": self._database_config(),
                "log_config": str(log_config),
                "media_store_path": str(self.media_store_path),
                "registration_shared_secret": self.registration_shared_secret,
                "enable_registration": False,
                "report_stats": False,
                "trusted_key_servers": [],
                "suppress_key_server_warning": True,
                "url_preview_enabled": False,
                "max_upload_size": "256M",
                "media_storage_providers": self._storage_providers(),
                **RELAXED_RATE_LIMITS,
                **self._federation_config(),
            }
        )
        config.update(self.extra_config)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.config = config
        return config

    # --- process --------------------------------------------------------------------------

    def launch(self) -> None:
        """Write the config and start Synapse without waiting."""
        self.write_config()
        self.process = ManagedProcess(
            f"Synapse {self.server_name}",
            [self.python, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            log_path=self.log_path,
            cwd=self.workdir,
            stop_timeout=10.0,
        )
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the client API answers /_matrix/client/versions."""
        assert self.process is not None, "launch() first"
        self.process.wait_for_http(f"{self.url}/_matrix/client/versions", timeout=timeout)

    # --- API helpers ----------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        json_body: Any = None,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request to Synapse; returns status, headers and body (errors included)."""
        all_headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=all_headers)
        try:
            with _DIRECT.open(req, timeout=60) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers.items()), err.read()

    def _api(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        status, _, raw = self.request(method, path, **kwargs)
        data = json.loads(raw) if raw else {}
        if status != 200:
            raise SynapseError(status, data, what)
        result: dict[str, Any] = data
        return result

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def register_user(self, localpart: str, password: str, *, admin: bool = False) -> str:
        """Create a user with the shared-secret admin API; return its access token."""
        path = "/_synapse/admin/v1/register"
        nonce = self._api("GET", path, "register nonce")["nonce"]
        mac = hmac.new(self.registration_shared_secret.encode(), digestmod=hashlib.sha1)
        for part in (nonce, localpart, password):
            mac.update(part.encode() + b"\x00")
        mac.update(b"admin" if admin else b"notadmin")
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        token: str = self._api("POST", path, f"register {localpart}", json_body=body)[
            "access_token"
        ]
        return token

    def login(self, localpart: str, password: str) -> str:
        """Log in with a password; return a new access token (a new device each time)."""
        body = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
        }
        token: str = self._api("POST", "/_matrix/client/v3/login", "login", json_body=body)[
            "access_token"
        ]
        return token

    def upload(
        self,
        token: str,
        data: bytes,
        *,
        content_type: str = "application/octet-stream",
        filename: str | None = None,
    ) -> str:
        """Upload media with ``POST /_matrix/media/v3/upload``; return its ``mxc://`` URI."""
        path = "/_matrix/media/v3/upload"
        if filename is not None:
            path += "?" + urllib.parse.urlencode({"filename": filename})
        uri: str = self._api(
            "POST",
            path,
            "upload",
            body=data,
            token=token,
            headers={"Content-Type": content_type},
        )["content_uri"]
        return uri

    def local_media_path(self, media_id: str) -> Path:
        """Where Synapse keeps a local upload in its media store."""
        return self.media_store_path / local_content_key(media_id)


_CERTIFICATE_SCRIPT: Final = """
import datetime, ipaddress, sys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (
    x509.CertificateBuilder()
    .subject_name(name)
    .issuer_name(name)
    .public_key(key.public_key())
    .serial_number(x509.random_serial_number())
    .not_valid_before(now - datetime.timedelta(days=1))
    .not_valid_after(now + datetime.timedelta(days=30))
    .add_extension(
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        critical=False,
    )
    .sign(key, hashes.SHA256())
)
open(sys.argv[1], "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(sys.argv[2], "wb").write(
    key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
)
"""


def _self_signed_certificate(python: str, cert: Path, key: Path) -> None:
    """A throwaway certificate for 127.0.0.1, made with the `cryptography` package Synapse
    ships with (so no openssl binary is needed)."""
    made = subprocess.run(
        [python, "-c", _CERTIFICATE_SCRIPT, str(cert), str(key)],
        check=False,
        capture_output=True,
        text=True,
    )
    if made.returncode != 0:
        raise StartupError(f"making a TLS certificate with {python} failed:\n{made.stderr}")


def local_content_key(media_id: str) -> str:
    """The store-relative path (and S3 key without prefix) of a local upload."""
    return f"local_content/{media_id[0:2]}/{media_id[2:4]}/{media_id[4:]}"


def parse_mxc(uri: str) -> tuple[str, str]:
    """Split ``mxc://server/media_id`` into (server, media_id)."""
    if not uri.startswith("mxc://"):
        raise ValueError(f"not an mxc URI: {uri!r}")
    server, _, media_id = uri[len("mxc://") :].partition("/")
    return server, media_id
