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

# Every MediaProxy started and not stopped yet: the tests check their logs after each test.
RUNNING: set[MediaProxy] = set()


class LogProblem(AssertionError):
    """media-proxy printed a line that is not a JSON event, or a traceback."""

    def __init__(self, path: Path, lines: list[str]) -> None:
        shown = "\n".join(line[:2000] for line in lines[:10])
        super().__init__(f"{len(lines)} problem line(s) in {path}:\n{shown}")
        self.lines = lines


_MARKER = "=== "  # ManagedProcess's own start/stop lines


def _read_log(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    events: list[dict[str, Any]] = []
    problems: list[str] = []
    for line in text.splitlines():
        if line.startswith(_MARKER):
            continue
        try:
            event = json.loads(line)
        except ValueError:
            problems.append(line)
            continue
        if not isinstance(event, dict) or "exception" in event or "Traceback" in line:
            problems.append(line)
        if isinstance(event, dict):
            events.append(event)
    return events, problems


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
        self._checked = 0  # bytes of the log already checked by check_log

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
        RUNNING.add(self)
        self.process.wait_for_http(self.url + HEALTH_PATH, timeout=timeout)
        return self

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON events the proxy has logged so far (its request log among them).

        Raises LogProblem on any line that is not a JSON event, or that carries a traceback:
        the proxy's output must stay machine-readable, and an expected condition (a client
        hang-up, S3 or Synapse down) is one event, never a traceback.
        """
        text = self.log_path.read_text()
        # a line still being written is read next time, not taken for a problem
        events, problems = _read_log(text[: text.rfind("\n") + 1])
        if problems:
            raise LogProblem(self.log_path, problems)
        return events

    def check_log(self) -> None:
        """Raise LogProblem for problem lines logged since the last check (see log_events)."""
        if not self.log_path.exists():
            return
        with self.log_path.open() as log:
            log.seek(self._checked)
            text = log.read()
        complete = text[: text.rfind("\n") + 1]  # a line being written is checked next time
        self._checked += len(complete.encode())
        _, problems = _read_log(complete)
        if problems:
            raise LogProblem(self.log_path, problems)

    def stop(self) -> None:
        """Stop the proxy, then check what it logged while stopping (LogProblem): a stop is
        an expected condition too, and nothing else looks at a stopped proxy's log."""
        if self.process is not None:
            self.process.stop()
            self.process = None
            RUNNING.discard(self)
            self.check_log()

    def restart(self, **changes: Any) -> Self:
        """Stop, change attributes (e.g. config=..., workers=...), start again on the same port."""
        self.stop()
        for key, value in changes.items():
            setattr(self, key, value)
        return self.start()
