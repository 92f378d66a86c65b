"""The container and service files, checked without a Docker engine (none runs here).

compose.yaml is validated for real by Debian's `docker-compose` 1.29 (`docker-compose config`,
which checks the file against the compose-spec JSON schema it ships,
compose/config/compose_spec.json, and interpolates .env.example); then its structure is
checked on the parsed file: services, start-up order, healthchecks, shared volumes, no
plaintext secrets. Also: the Dockerfiles' pins and user, the homeserver.yaml template rendered
by docker/synapse/configure.py, garage.toml, the shell scripts (`sh -n`, shellcheck) and the
systemd unit (`systemd-analyze verify`). Images are never built or run here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose.yaml"
ENV_EXAMPLE = REPO / ".env.example"

SERVICES = {"postgres", "synapse", "garage", "garage-init", "media-proxy", "nginx"}
MEDIA_STORE = "/data/media_store"  # media_store_path in docker/synapse/homeserver.yaml.template
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b|_KEY_|MACAROON", re.IGNORECASE)
REQUIRED_VAR = re.compile(r"^\$\{[A-Z0-9_]+:\?[^}]*\}$")  # ${NAME:?message}, no default


def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose is not installed (Debian package: docker-compose)")
    return found


def _compose_config(
    tmp_path: Path, env_file: Path, compose: Path = COMPOSE
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    for name in _env_example():
        env.pop(name, None)
    return subprocess.run(
        [
            _docker_compose(),
            "--project-directory",
            str(REPO),
            "--env-file",
            str(env_file),
            "-f",
            str(compose),
            "config",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    )


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target -> (source, mode) of a service's short-syntax volumes."""
    out = {}
    for entry in service.get("volumes", []):
        source, target, *mode = entry.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


# ---------------------------------------------------------------------------------------------
# compose.yaml


def test_compose_config_accepts_the_file(tmp_path: Path) -> None:
    result = _compose_config(tmp_path, ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == SERVICES
    assert resolved["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "change-me"


def test_compose_config_really_validates(tmp_path: Path) -> None:
    """A misspelt key makes `docker-compose config` fail: the check above is not a no-op."""
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    result = _compose_config(tmp_path, ENV_EXAMPLE, broken)
    assert result.returncode != 0
    assert "healthchek" in result.stderr


def test_compose_refuses_to_start_without_the_secrets(tmp_path: Path) -> None:
    env_file = tmp_path / "partial.env"
    env_file.write_text(
        "".join(f"{k}={v}\n" for k, v in _env_example().items() if k != "POSTGRES_PASSWORD")
    )
    result = _compose_config(tmp_path, env_file)
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_services_and_start_up_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    order = {
        name: {dep: spec["condition"] for dep, spec in s.get("depends_on", {}).items()}
        for name, s in services.items()
    }
    assert order == {
        "postgres": {},
        "garage": {},
        "garage-init": {"garage": "service_healthy"},
        "synapse": {
            "postgres": "service_healthy",
            "garage-init": "service_completed_successfully",
        },
        "media-proxy": {"synapse": "service_healthy"},
        "nginx": {"synapse": "service_healthy", "media-proxy": "service_healthy"},
    }


def test_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SERVICES - {"garage-init"}:
        check = services[name].get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    media = " ".join(services["media-proxy"]["healthcheck"]["test"])
    assert "urllib" in media and "/_media_proxy/health" in media
    # The one-shot job has none and is not restarted.
    assert "healthcheck" not in services["garage-init"]
    assert services["garage-init"]["restart"] == "no"


def test_synapse_and_media_proxy_share_the_media_store(compose: dict[str, Any]) -> None:
    services = compose["services"]
    synapse, proxy, nginx = (_mounts(services[n]) for n in ("synapse", "media-proxy", "nginx"))
    assert synapse[MEDIA_STORE] == ("media-store", "rw")
    assert proxy[MEDIA_STORE] == ("media-store", "rw")
    # nginx reads it in X-Accel mode, at the alias of media-proxy-accel.conf.
    assert nginx[MEDIA_STORE] == ("media-store", "ro")
    accel = (REPO / "nginx" / "media-proxy-accel.conf").read_text()
    assert f"alias {MEDIA_STORE}/;" in accel
    # The proxy reads the homeserver.yaml Synapse renders into its data volume.
    assert synapse["/data"] == ("synapse-data", "rw")
    ((target, mode),) = [(t, m) for t, (s, m) in proxy.items() if s == "synapse-data"]
    assert mode == "ro"
    command = services["media-proxy"]["command"]
    assert command[0] == "serve"
    assert command[command.index("--synapse-config") + 1] == f"{target}/homeserver.yaml"
    assert command[command.index("--synapse-url") + 1] == "http://synapse:8008"
    assert services["media-proxy"]["user"] == "991:991"  # Synapse's uid in its image
    # The site config nginx runs is this repository's.
    assert _mounts(services["nginx"])["/etc/nginx/conf.d/default.conf"][0] == (
        "./nginx/media-proxy.conf"
    )


def test_garage_init_shares_the_key_and_the_node(compose: dict[str, Any]) -> None:
    services = compose["services"]
    init = services["garage-init"]
    assert init["network_mode"] == "service:garage"
    assert _mounts(init)["/garage-keys"][0] == "garage-keys"
    assert _mounts(services["synapse"])["/garage-keys"] == ("garage-keys", "ro")
    assert _mounts(init)["/var/lib/garage/meta"] == ("garage-meta", "ro")
    assert init["environment"]["GARAGE_KEY_FILE"].startswith("/garage-keys/")


def test_no_plaintext_secrets_in_compose(compose: dict[str, Any]) -> None:
    checked = 0
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):  # _FILE: a path
                assert REQUIRED_VAR.match(str(value)), f"{name}.{key} = {value!r}"
                checked += 1
    assert checked >= 6
    # No value anywhere in the file is one of the example's secrets.
    secrets = {v for k, v in _env_example().items() if SECRET_NAME.search(k)}

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for k, v in node.items() for s in [str(k), *strings(v)]]
        if isinstance(node, list):
            return [s for v in node for s in strings(v)]
        return [str(node)]

    assert not secrets & set(strings(compose))


def test_env_file_is_ignored_and_example_is_not() -> None:
    def ignored(path: str) -> bool:
        result = subprocess.run(
            ["git", "check-ignore", "-q", path], cwd=REPO, capture_output=True, timeout=30
        )
        return result.returncode == 0

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert ignored(".env")
    assert not ignored(".env.example")
    # Every value compose.yaml requires is in the example.
    needed = set(re.findall(r"\$\{([A-Z0-9_]+):\?", COMPOSE.read_text()))
    assert needed <= set(_env_example())


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        if "image" in service:
            assert re.search(r":[\w.-]+$", service["image"]), name
            assert not service["image"].endswith(":latest"), name
    garage = services["garage"]["image"]
    assert re.fullmatch(r"dxflrs/garage:v2\.\d+\.\d+", garage)
    init_dockerfile = (REPO / "docker" / "garage" / "Dockerfile").read_text()
    assert f"ARG GARAGE_IMAGE={garage}\n" in init_dockerfile
    synapse_dockerfile = (REPO / "docker" / "synapse" / "Dockerfile").read_text()
    assert "FROM matrixdotorg/synapse:v1.163.2\n" in synapse_dockerfile
    assert "synapse-s3-storage-provider==1.7.0" in synapse_dockerfile


# ---------------------------------------------------------------------------------------------
# Dockerfile (media-proxy)


def test_media_proxy_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim", text, re.M)
    assert "pip install ." in text
    user = re.findall(r"^USER (\S+)", text, re.M)
    assert user and not user[-1].startswith(("root", "0"))
    healthcheck = re.search(r"^HEALTHCHECK .*(?:\n .*)*", text, re.M)
    assert healthcheck and "urllib.request" in healthcheck.group(0)
    assert "/_media_proxy/health" in text
    assert 'ENTRYPOINT ["media-proxy"]' in text
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and yaml.safe_load(cmd.group(1))[:3] == [
        "serve",
        "--synapse-config",
        "/data/homeserver.yaml",
    ]


def test_dockerignore_keeps_secrets_and_venvs_out_but_the_package_in() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".env", ".venv", ".git"} <= patterns
    for needed in ("pyproject.toml", "README.md", "media_proxy"):
        assert needed not in patterns


# ---------------------------------------------------------------------------------------------
# Synapse: homeserver.yaml rendered from the template


def _configure(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    directory = REPO / "docker" / "synapse"
    return subprocess.run(
        [
            sys.executable,
            str(directory / "configure.py"),
            str(directory / "homeserver.yaml.template"),
            str(tmp_path / "homeserver.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": os.environ.get("PATH", ""), **env},
    )


def test_homeserver_template_renders_what_media_proxy_reads(tmp_path: Path) -> None:
    key_file = tmp_path / "s3.env"
    key_file.write_text("S3_ACCESS_KEY_ID=GK0123\nS3_SECRET_ACCESS_KEY=s3cr3t\n")
    result = _configure(
        tmp_path,
        {
            "SYNAPSE_SERVER_NAME": "hs.test",
            "POSTGRES_PASSWORD": 'a "quoted": #password',
            "SYNAPSE_REGISTRATION_SHARED_SECRET": "r",
            "SYNAPSE_MACAROON_SECRET_KEY": "m",
            "SYNAPSE_FORM_SECRET": "f",
            "GARAGE_KEY_FILE": str(key_file),
        },
    )
    assert result.returncode == 0, result.stderr
    rendered = tmp_path / "homeserver.yaml"
    assert rendered.stat().st_mode & 0o777 == 0o640
    hs = yaml.safe_load(rendered.read_text())
    assert hs["server_name"] == "hs.test"
    assert hs["media_store_path"] == MEDIA_STORE
    assert hs["enable_authenticated_media"] is True
    assert hs["database"]["name"] == "psycopg2"
    assert hs["database"]["args"]["host"] == "postgres"
    assert hs["database"]["args"]["password"] == 'a "quoted": #password'
    listener = hs["listeners"][0]
    assert listener["x_forwarded"] is True and listener["port"] == 8008
    (provider,) = hs["media_storage_providers"]
    assert provider["module"] == "s3_storage_provider.S3StorageProviderBackend"
    assert provider["config"] == {
        "bucket": "matrix",
        "endpoint_url": "http://garage:3900",
        "region_name": "garage",
        "access_key_id": "GK0123",
        "secret_access_key": "s3cr3t",
    }
    # nginx's client_max_body_size must equal max_upload_size.
    site = (REPO / "nginx" / "media-proxy.conf").read_text()
    assert f"client_max_body_size {hs['max_upload_size']};" in site


def test_homeserver_template_names_a_missing_value(tmp_path: Path) -> None:
    result = _configure(tmp_path, {"GARAGE_KEY_FILE": str(tmp_path / "none")})
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr and "S3_SECRET_ACCESS_KEY" in result.stderr


# ---------------------------------------------------------------------------------------------
# Garage


def test_garage_toml_is_single_node_path_style_without_secrets() -> None:
    text = (REPO / "docker" / "garage" / "garage.toml").read_text()
    conf = tomllib.loads(text)
    assert conf["replication_factor"] == 1
    assert conf["s3_api"]["s3_region"] == "garage"
    assert "root_domain" not in conf["s3_api"]  # no virtual-host buckets: path-style only
    assert not any("secret" in key or "token" in key for key in conf)
    assert conf["metadata_dir"] == "/var/lib/garage/meta"


def test_garage_init_uses_the_cli_steps() -> None:
    text = (REPO / "docker" / "garage" / "init.sh").read_text()
    for step in (
        "garage layout assign",
        "garage layout apply",
        "garage key create",
        "garage bucket create",
        "garage bucket allow --read --write",
    ):
        assert step in text


SCRIPTS = [REPO / "docker" / "garage" / "init.sh", REPO / "docker" / "synapse" / "entrypoint.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.parent.name)
def test_shell_scripts_parse(script: Path) -> None:
    assert os.access(script, os.X_OK), f"{script} is not executable"
    result = subprocess.run(["sh", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_shell_scripts_pass_shellcheck() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (Debian package: shellcheck)")
    result = subprocess.run(
        [shellcheck, "--shell=sh", *map(str, SCRIPTS)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------------------------
# systemd


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    unit = (REPO / "contrib" / "systemd" / "media-proxy.service").read_text()
    for option in (
        "User=matrix-synapse",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/matrix-synapse/media",
        "PrivateTmp=yes",
        "--synapse-config /etc/matrix-synapse/homeserver.yaml",
        "--listen 127.0.0.1:8011",
    ):
        assert option in unit
    # verify wants ExecStart's binary to exist; everything else is checked as written.
    copy = tmp_path / "media-proxy.service"
    copy.write_text(
        unit.replace("/opt/media-proxy/bin/media-proxy", shutil.which("true") or "/bin/true")
    )
    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings: there must be none.
    assert result.stdout.strip() == "" and result.stderr.strip() == "", result.stderr
