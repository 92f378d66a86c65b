"""The `media-proxy` command: `serve` and `check`, sharing one set of configuration flags."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from media_proxy import __version__, logs
from media_proxy.config import Config, ConfigError, load


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="media-proxy's own YAML config file")
    parser.add_argument(
        "--synapse-config",
        type=Path,
        action="append",
        default=[],
        help="Synapse's homeserver.yaml (repeat for several files or config directories)",
    )
    parser.add_argument("--synapse-url", help="where Synapse listens, e.g. http://127.0.0.1:8008")
    parser.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8011)")
    parser.add_argument("--workers", type=int, help="worker processes sharing the port")
    parser.add_argument("--cache-path", help="cache directory (default: Synapse's media store)")
    parser.add_argument(
        "--accel-redirect", help="nginx internal location for cache hits, e.g. /_media_proxy_cache/"
    )
    parser.add_argument("--log-format", choices=("auto", "json", "console"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="media-proxy", description="Serve Synapse's media from a managed cache backed by S3."
    )
    parser.add_argument("--version", action="version", version=f"media-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("serve", help="run the proxy"))
    _common(sub.add_parser("check", help="check configuration, database, S3, cache and Synapse"))
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "synapse_url": args.synapse_url,
        "listen": args.listen,
        "workers": args.workers,
        "cache_path": args.cache_path,
        "accel_redirect": args.accel_redirect,
        "log_format": args.log_format,
    }
    return load(config_file=args.config, synapse_config=args.synapse_config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _load(args)
    except ConfigError as e:
        print(f"media-proxy: configuration error: {e}", file=sys.stderr)
        return 2
    logs.configure(config.log_format, config.log_level)
    if args.command == "check":
        from media_proxy import check

        return asyncio.run(check.run(config))
    from media_proxy import server

    server.main_asyncio_policy()
    return server.serve(config)
