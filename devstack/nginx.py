"""nginx from Debian, run as a non-daemon with the shipped site rendered for loopback.

The very config an administrator copies (nginx/media-proxy.conf), only with the listen
address, upstreams and paths replaced (nginx/render_test_config.py), so the demo and the
tests exercise what is shipped.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Self

from devstack.procs import LOOPBACK, ManagedProcess, StartupError, free_port, tail

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_renderer() -> ModuleType:
    """nginx/render_test_config.py: a script beside the configs it renders, not a package."""
    name = "render_test_config"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "nginx" / f"{name}.py")
    if spec is None or spec.loader is None:
        raise StartupError(f"cannot load {REPO_ROOT / 'nginx' / name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise StartupError("nginx is not installed: scripts/setup installs it (Debian: nginx)")
    return found


class Nginx:
    """Debian's nginx in the foreground with the shipped site (nginx/media-proxy.conf) rendered
    for loopback by nginx/render_test_config.py; stopped by its PID.

    X-Accel mode is on when ``accel_root`` (the proxy's cache directory) is given; fast-hit
    mode too with ``fast_hits``.
    """

    def __init__(
        self,
        prefix: Path,
        *,
        media_proxy: Sequence[str],
        synapse: str,
        server_name: str,
        accel_root: Path | None = None,
        fast_hits: bool = False,
        client_max_body_size: str | None = None,
        port: int | None = None,
    ) -> None:
        self.prefix = prefix.resolve()
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.media_proxy = list(media_proxy)
        self.synapse = synapse
        self.server_name = server_name
        self.accel_root = accel_root
        self.fast_hits = fast_hits
        self.client_max_body_size = client_max_body_size
        self.log_path = self.prefix / "logs" / "nginx.out"  # stdout and stderr
        self.error_log = self.prefix / "logs" / "error.log"
        self.access_log = self.prefix / "logs" / "access.log"
        self.process: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "start() first"
        return self.process.pid

    def start(self, timeout: float = 15.0) -> Self:
        renderer = load_renderer()
        renderer.render_test_config(
            self.prefix,
            listen=f"{LOOPBACK}:{self.port}",
            media_proxy=self.media_proxy,
            synapse=self.synapse,
            server_name=self.server_name,
            accel_root=self.accel_root,
            fast_hits=self.fast_hits,
            client_max_body_size=self.client_max_body_size,
        )
        argv: list[str] = renderer.nginx_command(self.prefix, nginx=nginx_binary())
        self.process = ManagedProcess("nginx", argv, log_path=self.log_path, stop_timeout=10.0)
        try:
            self.process.wait_for_port(self.port, timeout=timeout)
        except StartupError as e:
            self.process.stop()
            raise StartupError(
                f"{e}\nerror log {self.error_log}:\n{tail(self.error_log)}"
            ) from None
        return self

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        return [int(p) for p in children.split()]

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None
