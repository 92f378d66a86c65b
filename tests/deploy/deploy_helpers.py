"""Shared parts of the deployment tests (a plain module, not a conftest, so that its name is
unique on sys.path): the nginx config renderer, small fake upstream servers
(standing in for media-proxy and Synapse) and nginx itself, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
ACCEL_PREFIX = "/_media_proxy_cache/"

# Synapse's download headers (reference section 4.3) as media-proxy sends them on an X-Accel hit:
# no Content-Length, no body.
DOWNLOAD_HEADERS: list[tuple[str, str]] = [
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS"),
    ("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date"),
    ("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server"),
    ("Cross-Origin-Resource-Policy", "cross-origin"),
    (
        "Content-Security-Policy",
        "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; "
        "style-src 'unsafe-inline'; media-src 'self'; object-src 'self';",
    ),
    ("X-Content-Security-Policy", "sandbox;"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Type", "text/plain; charset=UTF-8"),
    ("Content-Disposition", "inline; filename*=utf-8''a%20b.txt"),
    ("Cache-Control", "public,max-age=86400,s-maxage=0,proxy-revalidate"),
    ("ETag", "1"),
    ("X-Robots-Tag", "noindex, nofollow, noarchive, noimageindex"),
]
# Thumbnails: CORS and CORP, no CSP, X-Content-Security-Policy or Referrer-Policy.
THUMBNAIL_HEADERS: list[tuple[str, str]] = [
    (k, v)
    for k, v in DOWNLOAD_HEADERS
    if k not in ("Content-Security-Policy", "X-Content-Security-Policy", "Referrer-Policy")
    and k != "Content-Disposition"
] + [("Content-Disposition", "inline")]


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        pytest.skip("nginx is not installed (Debian package: nginx)")
    return found


def load_renderer() -> ModuleType:
    """nginx/render_test_config.py, which is a script beside the configs, not a package."""
    name = "render_test_config"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "nginx" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Fake upstreams


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    peer_port: int
    body: bytes


@dataclass
class FakeUpstream:
    """One HTTP/1.1 keep-alive server. By default it answers JSON naming itself and echoing
    what it received. Request headers steer it:
      X-Test-Accel: REL          answer like media-proxy on a cache hit: Synapse's headers,
                                 empty body, X-Accel-Redirect: /_media_proxy_cache/REL
      X-Test-Kind: thumbnail     ... with a thumbnail's headers
      X-Test-Accel-Once: 1       redirect only the first request for REL, then stream the
                                 body b"from-s3" itself (the proxy after an eviction)
    """

    name: str
    seen: list[Seen] = field(default_factory=list)
    started: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    redirected: set[str] = field(default_factory=set)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self.lock:
            self.seen.clear()
            self.started.clear()
            self.redirected.clear()

    def paths(self) -> list[str]:
        with self.lock:
            return [s.path for s in self.seen]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    upstream: FakeUpstream

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        up = self.upstream
        with up.lock:
            up.started.append(self.path)
        body = self._read_body()
        with up.lock:
            up.seen.append(
                Seen(self.command, self.path, dict(self.headers), self.client_address[1], body)
            )
        rel = self.headers.get("X-Test-Accel")
        if rel is not None:
            media = THUMBNAIL_HEADERS if self.headers.get("X-Test-Kind") else DOWNLOAD_HEADERS
            with up.lock:
                again = rel in up.redirected and self.headers.get("X-Test-Accel-Once")
                up.redirected.add(rel)
            if again:
                self._send(200, media, b"from-s3")
            else:
                self._send(200, [*media, ("X-Accel-Redirect", ACCEL_PREFIX + rel)], b"")
            return
        echo = {
            "upstream": up.name,
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "x_forwarded_for": self.headers.get("X-Forwarded-For"),
            "x_forwarded_proto": self.headers.get("X-Forwarded-Proto"),
            "x_request_id": self.headers.get("X-Request-ID"),
            "connection": self.headers.get("Connection"),
            "body_length": len(body),
        }
        self._send(200, [("Content-Type", "application/json")], json.dumps(echo).encode())

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_OPTIONS = _handle


@contextlib.contextmanager
def fake_upstream(name: str) -> Iterator[FakeUpstream]:
    up = FakeUpstream(name)
    handler = type(f"Handler_{name}", (_Handler,), {"upstream": up})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    up.server = server
    thread = threading.Thread(target=server.serve_forever, name=f"fake-{name}", daemon=True)
    thread.start()
    try:
        yield up
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ---------------------------------------------------------------------------------------------
# nginx


@dataclass
class Nginx:
    prefix: Path
    port: int
    process: subprocess.Popen[bytes]

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def request(
        self,
        path: str,
        *,
        method: str = "GET",
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def json(self, path: str, **kwargs: object) -> dict[str, object]:
        status, _, body = self.request(path, **kwargs)  # type: ignore[arg-type]
        assert status == 200, (status, body)
        return dict(json.loads(body))


@contextlib.contextmanager
def run_nginx(prefix: Path, port: int) -> Iterator[Nginx]:
    """Start nginx in the foreground on a rendered prefix; stop it by its PID."""
    renderer = load_renderer()
    cmd = renderer.nginx_command(prefix, nginx=nginx_binary())
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    nginx = Nginx(prefix, port, process)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"nginx exited: {stderr}\n{nginx.error_log()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not listen on {port}\n{nginx.error_log()}")
            time.sleep(0.05)
        yield nginx
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        if process.stderr:
            process.stderr.close()
