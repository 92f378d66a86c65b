"""media-proxy itself as a child process, in front of a dev-stack Synapse.

Started exactly as an administrator starts it (`media-proxy serve --synapse-config ...`),
so tests, the demo and benchmarks exercise the real command, config loading and workers.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from devstack.procs import LOOPBACK, ManagedProcess, free_port
from media_proxy.server import HEALTH_PATH


class MediaProxy:
    def __init__(
        self,
        workdir: Path,
        *,
        synapse_config: Path,
        synapse_url: str,
        workers: int = 1,
        port: int | None = None,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir.resolve()
        self.synapse_config = synapse_config
        self.synapse_url = synapse_url
        self.workers = workers
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log_path = self.workdir / "media-proxy.log"
        self.config_path = self.workdir / "media-proxy.yaml"
        self.config = dict(config or {})
        self.env = dict(env or {})
        self.extra_args = list(extra_args)
        self.process: ManagedProcess | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "media_proxy",
            "serve",
            "--config",
            str(self.config_path),
            "--synapse-config",
            str(self.synapse_config),
            "--synapse-url",
            self.synapse_url,
            "--listen",
            f"{LOOPBACK}:{self.port}",
            "--workers",
            str(self.workers),
            "--log-format",
            "json",
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.process = ManagedProcess(
            "media-proxy",
            self.argv(),
            log_path=self.log_path,
            env={**os.environ, **self.env},
        )
        self.process.wait_for_http(self.url + HEALTH_PATH, timeout=timeout)
        return self

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON events the proxy has logged so far (its request log among them)."""
        events: list[dict[str, Any]] = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    def restart(self, **changes: Any) -> Self:
        """Stop, change attributes (e.g. config=..., workers=...), start again on the same port."""
        self.stop()
        for key, value in changes.items():
            setattr(self, key, value)
        return self.start()
