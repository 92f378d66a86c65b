"""Render nginx/media-proxy.conf for a test or local run: loopback ports, real paths, no root.

The production files stay the source of truth: lines tagged `# @name` in media-proxy.conf and
media-proxy-accel.conf are rewritten, nothing else changes, and a tag that went missing is an
error (so a test cannot silently run a config that drifted from production).

    from render_test_config import render_test_config, nginx_command
    conf = render_test_config(prefix, listen="127.0.0.1:18080",
                              media_proxy=["127.0.0.1:18011"], synapse="127.0.0.1:18008",
                              accel_root=cache_dir)          # None: X-Accel mode off
    subprocess.Popen(nginx_command(prefix))

or from a shell:

    python nginx/render_test_config.py PREFIX --listen 127.0.0.1:18080 \
        --media-proxy 127.0.0.1:18011 --synapse 127.0.0.1:18008 [--accel-root DIR]

Tags: @listen, @media_proxy_servers, @synapse_servers, @federation_key (the homeserver's
server_name in the hash key of federation requests), @client_max_body_size, @accel_include
(the X-Accel switch), @accel_root (the cache directory nginx serves in X-Accel mode),
@fast_http_include and @fast_include (the fast-hit switch), @fast_root (the cache directory
again) and @fast_cache_path (where nginx keeps the proxy's decisions).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

HERE: Final = Path(__file__).resolve().parent
SITE: Final = HERE / "media-proxy.conf"
ACCEL: Final = HERE / "media-proxy-accel.conf"
FAST: Final = HERE / "media-proxy-fast-hits.conf"
FAST_HTTP: Final = HERE / "media-proxy-fast-hits-http.conf"
MAIN: Final = HERE / "nginx.conf"

SITE_TAGS: Final = frozenset(
    {
        "listen",
        "media_proxy_servers",
        "synapse_servers",
        "federation_key",
        "client_max_body_size",
        "accel_include",
        "fast_http_include",
        "fast_include",
    }
)
ACCEL_TAGS: Final = frozenset({"accel_root"})
FAST_TAGS: Final = frozenset({"fast_root"})
FAST_HTTP_TAGS: Final = frozenset({"fast_cache_path"})

_TAGGED: Final = re.compile(r"^(?P<indent>[ \t]*)(?P<body>.*?)[ \t]*#[ \t]*@(?P<tag>\w+)[ \t]*$")

Rule = Callable[[str], list[str]]


class RenderError(ValueError):
    pass


def _rewrite(text: str, rules: dict[str, Rule], expected: frozenset[str]) -> str:
    """Replace each group of lines tagged `# @tag` by rules[tag](first line's body).

    The first line of a group is replaced by the rule's lines (each keeping the indentation
    and the tag); later lines with the same tag are dropped.
    """
    out: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        m = _TAGGED.match(line)
        if m is None:
            out.append(line)
            continue
        tag, indent, body = m["tag"], m["indent"], m["body"]
        if tag not in expected:
            raise RenderError(f"unknown tag @{tag} in line {line!r}")
        if tag in seen:
            continue
        seen.add(tag)
        rule = rules.get(tag)
        new = [body] if rule is None else rule(body)
        out.extend(f"{indent}{b}  # @{tag}" for b in new)
    missing = expected - seen
    if missing:
        raise RenderError(f"tags missing from the config: {sorted(missing)}")
    return "\n".join(out) + "\n"


def _servers(addresses: Sequence[str]) -> Rule:
    if not addresses:
        raise RenderError("an upstream needs at least one server")
    return lambda _body: [f"server {a};" for a in addresses]


def render_site(
    text: str,
    *,
    listen: str | Sequence[str],
    media_proxy: Sequence[str],
    synapse: str | Sequence[str],
    server_name: str = "example.com",
    accel: bool = False,
    fast_hits: bool = False,
    client_max_body_size: str | None = None,
) -> str:
    """media-proxy.conf with test addresses; `accel` uncomments the X-Accel include,
    `fast_hits` the two fast-hit includes (it needs `accel`)."""
    if fast_hits and not accel:
        raise RenderError("fast-hit mode needs X-Accel mode")
    listens = [listen] if isinstance(listen, str) else list(listen)
    synapses = [synapse] if isinstance(synapse, str) else list(synapse)
    if not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", server_name):
        raise RenderError(f"not a server name: {server_name!r}")

    def federation_key(body: str) -> list[str]:
        new, n = re.subn(r"\S+/\$1;$", f"{server_name}/$1;", body)
        if n != 1:
            raise RenderError(f"cannot find the server name in {body!r}")
        return [new]

    def accel_include(body: str) -> list[str]:
        return [body.lstrip("# ").strip() if accel else body]

    def fast_include(body: str) -> list[str]:
        return [body.lstrip("# ").strip() if fast_hits else body]

    rules: dict[str, Rule] = {
        "listen": lambda _body: [f"listen {a};" for a in listens],
        "media_proxy_servers": _servers(media_proxy),
        "synapse_servers": _servers(synapses),
        "federation_key": federation_key,
        "accel_include": accel_include,
        "fast_http_include": fast_include,
        "fast_include": fast_include,
    }
    if client_max_body_size is not None:
        size = client_max_body_size
        rules["client_max_body_size"] = lambda _body: [f"client_max_body_size {size};"]
    return _rewrite(text, rules, SITE_TAGS)


def render_accel(text: str, *, accel_root: str | os.PathLike[str]) -> str:
    """media-proxy-accel.conf serving `accel_root` (the proxy's cache directory)."""
    root = Path(accel_root).resolve()
    if any(c in str(root) for c in " ;{}\"'\\"):
        raise RenderError(f"path needs quoting in nginx: {root}")
    return _rewrite(text, {"accel_root": lambda _body: [f"alias {root}/;"]}, ACCEL_TAGS)


def render_fast(text: str, *, accel_root: str | os.PathLike[str]) -> str:
    """media-proxy-fast-hits.conf serving `accel_root` (the proxy's cache directory)."""
    root = Path(accel_root).resolve()
    if any(c in str(root) for c in " ;{}\"'\\"):
        raise RenderError(f"path needs quoting in nginx: {root}")
    return _rewrite(text, {"fast_root": lambda _body: [f"root {root};"]}, FAST_TAGS)


def render_fast_http(text: str, *, cache_path: str | os.PathLike[str]) -> str:
    """media-proxy-fast-hits-http.conf keeping the decisions under `cache_path`."""

    def rule(body: str) -> list[str]:
        new, n = re.subn(r"^proxy_cache_path \S+", f"proxy_cache_path {Path(cache_path)}", body)
        if n != 1:
            raise RenderError(f"cannot find the cache path in {body!r}")
        return [new]

    return _rewrite(text, {"fast_cache_path": rule}, FAST_HTTP_TAGS)


def render_test_config(
    prefix: str | os.PathLike[str],
    *,
    listen: str | Sequence[str],
    media_proxy: Sequence[str],
    synapse: str | Sequence[str],
    server_name: str = "example.com",
    accel_root: str | os.PathLike[str] | None = None,
    fast_hits: bool = False,
    client_max_body_size: str | None = None,
) -> Path:
    """Write PREFIX/conf/{nginx.conf,media-proxy.conf,snippets/...} and PREFIX/{logs,temp}/.

    X-Accel mode is on when `accel_root` is given, fast-hit mode too with `fast_hits`.
    Returns the path of nginx.conf.
    """
    prefix = Path(prefix).resolve()
    conf = prefix / "conf"
    for d in (conf / "snippets", prefix / "logs", prefix / "temp"):
        d.mkdir(parents=True, exist_ok=True)
    (conf / "nginx.conf").write_text(MAIN.read_text())
    (conf / "media-proxy.conf").write_text(
        render_site(
            SITE.read_text(),
            listen=listen,
            media_proxy=media_proxy,
            synapse=synapse,
            server_name=server_name,
            accel=accel_root is not None,
            fast_hits=fast_hits,
            client_max_body_size=client_max_body_size,
        )
    )
    if accel_root is not None:
        (conf / "snippets" / "media-proxy-accel.conf").write_text(
            render_accel(ACCEL.read_text(), accel_root=accel_root)
        )
    if accel_root is not None and fast_hits:
        (conf / "snippets" / "media-proxy-fast-hits.conf").write_text(
            render_fast(FAST.read_text(), accel_root=accel_root)
        )
        (conf / "snippets" / "media-proxy-fast-hits-http.conf").write_text(
            render_fast_http(FAST_HTTP.read_text(), cache_path=prefix / "temp" / "decisions")
        )
    return conf / "nginx.conf"


def nginx_command(
    prefix: str | os.PathLike[str], *, nginx: str = "nginx", test: bool = False
) -> list[str]:
    """The command that runs (or with `test`, checks) the config in the foreground.

    Started as root, nginx would run its workers as `nobody`, who cannot enter a private
    temporary directory (pytest's are 0700); the workers then keep the caller's user, as
    they do when a non-root user starts nginx.
    """
    prefix = Path(prefix).resolve()
    directives = "daemon off;"
    if os.geteuid() == 0:
        directives += " user root;"
    cmd = [nginx, "-p", f"{prefix}/", "-c", str(prefix / "conf" / "nginx.conf"), "-g", directives]
    if test:
        cmd.append("-t")
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix", type=Path)
    parser.add_argument("--listen", action="append", required=True, help="e.g. 127.0.0.1:18080")
    parser.add_argument("--media-proxy", action="append", required=True, help="HOST:PORT")
    parser.add_argument("--synapse", action="append", required=True, help="HOST:PORT")
    parser.add_argument("--server-name", default="example.com", help="homeserver server_name")
    parser.add_argument("--accel-root", type=Path, help="cache directory: X-Accel mode on")
    parser.add_argument(
        "--fast-hits", action="store_true", help="fast-hit mode too (needs --accel-root)"
    )
    parser.add_argument("--client-max-body-size", help="Synapse's max_upload_size, e.g. 50M")
    args = parser.parse_args(argv)
    render_test_config(
        args.prefix,
        listen=args.listen,
        media_proxy=args.media_proxy,
        synapse=args.synapse,
        server_name=args.server_name,
        accel_root=args.accel_root,
        fast_hits=args.fast_hits,
        client_max_body_size=args.client_max_body_size,
    )
    print(shlex.join(nginx_command(args.prefix)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
