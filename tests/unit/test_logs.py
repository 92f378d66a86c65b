"""logs.py: the direct `request` event renders as structlog's chain would, and lines are
gathered per loop iteration without ever being cut, reordered or lost."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from media_proxy.logs import pieces

ROOT = Path(__file__).resolve().parents[2]


def run(script: str) -> tuple[list[str], str]:
    """Run `script` in a fresh interpreter (logging is process-wide state); its stderr lines
    and its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=True,
    )
    return done.stderr.splitlines(), done.stdout


def run_to_file(out: Path, body: str) -> str:
    """Run `body` in a fresh interpreter whose stderr is the file `out`, after
    `logs.configure("json", "info")`; its stdout."""
    script = f"""
import asyncio, os, sys, threading
fd = os.open({str(out)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.dup2(fd, 2)
import structlog
from media_proxy import logs
logs.configure("json", "info")
log = structlog.get_logger("t")
"""
    done = subprocess.run(
        [sys.executable, "-c", script + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return done.stdout


FIELDS = {
    "request_id": "r1",
    "method": "GET",
    "path": '/_matrix/media/v3/download/h\u00e9/"x"\n',
    "route": "legacy-download",
    "media_id": None,
    "source": "cache",
    "status": 200,
    "bytes": 1024,
    "ms": 0.25,
    "aborted": "client",
}


def test_direct_event_is_structlogs_line() -> None:
    lines, _ = run(
        f"""
        import structlog
        from media_proxy import logs
        logs.configure("json", "info")
        fields = {FIELDS!r}
        structlog.get_logger("media_proxy").info("request", **dict(fields))
        logs.info("request", dict(fields))
        """
    )
    assert len(lines) == 2
    through_structlog, direct = (json.loads(line) for line in lines)
    assert list(direct) == list(through_structlog)  # the same keys in the same order
    assert direct.pop("timestamp").endswith("Z")
    through_structlog.pop("timestamp")
    assert direct == through_structlog
    assert direct["path"] == '/_matrix/media/v3/download/hé/"x"\n'
    assert lines[1].isascii()


def test_direct_event_carries_bound_context_and_obeys_the_level() -> None:
    lines, _ = run(
        """
        import structlog
        from media_proxy import logs
        logs.configure("json", "info")
        structlog.contextvars.bind_contextvars(process="upkeep")
        logs.info("request", {"status": 200})
        logs.configure("json", "warning")
        logs.info("request", {"status": 201})
        structlog.get_logger("x").warning("still.here")
        """
    )
    events = [json.loads(line) for line in lines]
    assert [e["event"] for e in events] == ["request", "still.here"]
    assert events[0]["process"] == "upkeep"
    assert events[0]["level"] == "info"


def test_console_output_goes_through_structlog() -> None:
    lines, _ = run(
        """
        from media_proxy import logs
        logs.configure("console", "info")
        logs.info("request", {"status": 200, "path": "/x"})
        """
    )
    assert len(lines) == 1
    assert "request" in lines[0] and "status" in lines[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_lines_keep_the_order_of_their_events() -> None:
    """Gathered events, a thread's event (written at once, after what was gathered), the
    standard library's records and events after the loop: in the order they happened."""
    lines, _ = run(
        """
        import asyncio, logging, threading
        import structlog
        from media_proxy import logs
        logs.configure("json", "info")
        log = structlog.get_logger("t")

        async def main() -> None:
            log.info("one")
            logs.info("two", {})
            logging.getLogger("aiohttp.server").warning("three")
            thread = threading.Thread(target=lambda: log.info("four"))
            thread.start()
            thread.join()
            log.info("five")
            await asyncio.sleep(0)
            log.info("six")  # gathered as main() returns: written as the loop winds down
        asyncio.run(main())
        log.info("seven")
        """
    )
    events = [json.loads(line)["event"] for line in lines]
    assert events == ["one", "two", "three", "four", "five", "six", "seven"]


def test_gathered_lines_reach_a_file_only_at_the_end_of_the_iteration(tmp_path: Path) -> None:
    out = tmp_path / "err.log"
    stdout = run_to_file(
        out,
        """
        async def main() -> None:
            for i in range(50):
                logs.info("request", {"i": i, "pad": "x" * 100})
            print(os.fstat(2).st_size, flush=True)
            await asyncio.sleep(0)
            print(os.fstat(2).st_size, flush=True)
            log.info("last")
        asyncio.run(main())
        """,
    )
    during, after_turn = (int(n) for n in stdout.split())
    assert during == 0
    text = out.read_text()
    assert after_turn > 50 * 100
    events = [json.loads(line) for line in text.splitlines()]
    assert [e.get("i") for e in events[:50]] == list(range(50))
    assert events[-1]["event"] == "last"


def test_lines_outside_the_gathering_loop_are_written_at_once(tmp_path: Path) -> None:
    """While a flush is due on a loop: a line from another thread, or from the loop's own
    thread once that loop has stopped (its flush never runs), is written at once with what
    was gathered before it."""
    out = tmp_path / "err.log"
    stdout = run_to_file(
        out,
        """
        async def main() -> None:
            logs.info("gathered", {})
            logs.info("gathered too", {})
            thread = threading.Thread(target=lambda: logs.info("thread", {}))
            thread.start()
            thread.join()
            print(os.fstat(2).st_size, flush=True)
        asyncio.run(main())

        loop = asyncio.new_event_loop()
        loop.call_soon(logs.info, "in the last iteration", {})
        loop.call_soon(loop.stop)
        loop.run_forever()  # stops before the flush it set could run
        before = os.fstat(2).st_size
        logs.info("after the loop", {})
        print(before, os.fstat(2).st_size, flush=True)
        """,
    )
    after_thread, before, after = (int(n) for n in stdout.split())
    events = [json.loads(line)["event"] for line in out.read_text().splitlines()]
    assert events == [
        "gathered",
        "gathered too",
        "thread",
        "in the last iteration",
        "after the loop",
    ]
    assert after_thread > 0  # the thread's line and the two gathered before it
    assert after > before


def test_a_worker_leaving_by_os_exit_after_flush_keeps_its_lines(tmp_path: Path) -> None:
    """What `_supervise`'s workers do: `logs.flush()` then `os._exit`, which skips atexit."""
    out = tmp_path / "err.log"
    for flush in (True, False):
        out.write_bytes(b"")
        run_to_file(
            out,
            f"""
            async def main() -> None:
                logs.info("request", {{"n": 1}})
                if {flush}:
                    logs.flush()
                os._exit(0)
            asyncio.run(main())
            """,
        )
        written = out.read_text()
        assert ('"n": 1' in written) is flush


def test_gathered_lines_are_written_once_across_a_fork() -> None:
    lines, _ = run(
        """
        import asyncio, os
        from media_proxy import logs
        logs.configure("json", "info")

        async def main() -> None:
            logs.info("before.fork", {})
            pid = os.fork()
            if pid == 0:
                logs.info("child", {})
                logs.flush()
                os._exit(0)
            os.waitpid(pid, 0)
            logs.info("parent", {})
        asyncio.run(main())
        """
    )
    events = [json.loads(line)["event"] for line in lines]
    assert events == ["before.fork", "child", "parent"]


@given(st.lists(st.binary(min_size=1, max_size=300).map(lambda b: b + b"\n"), max_size=60))
def test_pieces_are_whole_lines_in_order_within_the_limit(lines: list[bytes]) -> None:
    out = pieces(lines, limit=512)
    assert b"".join(out) == b"".join(lines)
    bounds = set()
    at = 0
    for line in lines:
        at += len(line)
        bounds.add(at)
    at = 0
    for piece in out:
        at += len(piece)
        assert at in bounds  # a piece ends where a line ends
        assert len(piece) <= 512 or piece in lines  # longer only as a line of its own


def test_pieces_join_short_lines_and_keep_a_long_one_alone() -> None:
    assert pieces([b"a\n", b"b\n"]) == [b"a\nb\n"]
    long = b"x" * 5000 + b"\n"
    assert pieces([b"a\n", long, b"b\n"]) == [b"a\n", long, b"b\n"]
    assert pieces([b"y" * 3000 + b"\n", b"z" * 2000 + b"\n"]) == [
        b"y" * 3000 + b"\n",
        b"z" * 2000 + b"\n",
    ]
    assert pieces([]) == []
