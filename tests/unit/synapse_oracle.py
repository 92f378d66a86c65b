"""Ask Synapse itself: run a snippet with Synapse's interpreter (its own virtualenv) and read
its JSON answer, so the unit tables are compared with what Synapse really does."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

SYNAPSE_PYTHON = Path(__file__).resolve().parents[2] / ".venv-synapse" / "bin" / "python"


def run_synapse(script: str, payload: object) -> Any:
    """Run `script` with Synapse's interpreter: JSON `payload` in, JSON (last line) out."""
    if not SYNAPSE_PYTHON.exists():
        pytest.skip(f"no Synapse virtualenv at {SYNAPSE_PYTHON}: cannot compare with Synapse")
    proc = subprocess.run(
        [str(SYNAPSE_PYTHON), "-c", script],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])
