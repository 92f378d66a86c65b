"""devstack.procs: a script stopped with SIGTERM stops the servers it started.

A real script in a subprocess starts a real child (`sleep`) through ManagedProcess, then is
sent SIGTERM, as `kill PID` or a CI timeout would: the child must be gone when it has exited.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_sigterm_stops_the_servers_a_script_started(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from pathlib import Path
            sys.path.insert(0, {str(REPO)!r})
            from devstack.procs import ManagedProcess, stop_on_sigterm
            stop_on_sigterm()
            log = Path({str(tmp_path)!r}) / "log"
            child = ManagedProcess("sleeper", ["sleep", "600"], log_path=log)
            try:
                # told inside the try: a SIGTERM sent as soon as the pid is read (this
                # process preempted right after its write) still finds the finally armed
                print(child.pid, flush=True)
                time.sleep(600)
            finally:
                print("finally", flush=True)
            """
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    try:
        assert Path(f"/proc/{child}").exists()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        assert proc.stdout.read() == "finally\n"  # the script's own clean-up ran too
        assert not Path(f"/proc/{child}").exists()  # stopped and reaped by stop_all
    finally:
        if Path(f"/proc/{child}").exists():  # the test failed: leave nothing behind
            os.kill(child, signal.SIGKILL)
