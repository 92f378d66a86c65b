"""The `media-proxy` command: `serve`, `check` and `cache status|upload|evict`, sharing one set
of configuration flags."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn

from media_proxy import __version__, logs
from media_proxy.config import Config, ConfigError, load, parse_duration, parse_size

# The shared configuration flags: every command accepts all of them, so the arguments of
# `serve` work unchanged with `check` and the `cache` commands; each command's help lists
# only those it uses.
_CONFIG_FLAGS: Final[dict[str, dict[str, Any]]] = {
    "--config": {"type": Path, "help": "media-proxy's own YAML config file"},
    "--synapse-config": {
        "type": Path,
        "action": "append",
        "default": [],
        "help": "Synapse's homeserver.yaml (repeat for several files or config directories)",
    },
    "--synapse-url": {"help": "where Synapse listens, e.g. http://127.0.0.1:8008"},
    "--listen": {"help": "HOST:PORT to listen on (default 127.0.0.1:8011)"},
    "--workers": {"type": int, "help": "worker processes sharing the port"},
    "--metrics-listen": {"help": "HOST:PORT for Prometheus metrics at /metrics (default: off)"},
    "--cache-path": {"help": "cache directory (default: Synapse's media store)"},
    "--accel-redirect": {
        "help": "nginx internal location for cache hits, e.g. /_media_proxy_cache/"
    },
    "--cache-max-size": {"help": "evict in the background to keep the cache under SIZE (e.g. 50G)"},
    "--log-format": {
        "choices": ("auto", "json", "console"),
        "help": "auto (default): console on a terminal, else json",
    },
}
# What the offline `cache` commands read: no Synapse, no listener.
_CACHE_FLAGS: Final = frozenset({"--config", "--synapse-config", "--cache-path", "--log-format"})


def _common(parser: argparse.ArgumentParser, uses: Collection[str] | None = None) -> None:
    """Add every shared configuration flag; help shows those in `uses` (default: all)."""
    for flag, options in _CONFIG_FLAGS.items():
        shown = uses is None or flag in uses
        parser.add_argument(flag, **{**options, **({} if shown else {"help": argparse.SUPPRESS})})


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `media-proxy serve: --workers: invalid int value: 'x'`
    (plain argparse prints the whole usage first). `--help` still shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="media-proxy", description="Serve Synapse's media from a managed cache backed by S3."
    )
    parser.add_argument("--version", action="version", version=f"media-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("serve", help="run the proxy"))
    # check shows and checks the configuration serve would run with: it uses every flag
    _common(sub.add_parser("check", help="check configuration, database, S3, cache and Synapse"))
    _cache_commands(sub.add_parser("cache", help="the cache's upkeep: status, upload, evict"))
    _s3_commands(sub)
    _bench_command(sub)
    return parser


def _bench_command(sub: Any) -> None:
    from media_proxy import bench

    parser = sub.add_parser("bench", help="a bounded load of media downloads against a URL")
    _common(parser, _CACHE_FLAGS)  # it reads the database, S3 and the store, as `cache` does
    bench.add_arguments(parser)


def _s3_commands(sub: Any) -> None:
    """`s3 prune` and `s3 audit` (media_proxy/lifecycle.py)."""
    s3 = sub.add_parser("s3", help="the bucket's side of the media lifecycle: prune, audit")
    s3_sub = s3.add_subparsers(dest="s3_command", required=True)
    prune = s3_sub.add_parser("prune", help="delete S3 objects whose media Synapse deleted")
    prune.add_argument("--min-age", default="7d", help="never delete younger objects (default 7d)")
    prune.add_argument(
        "--kinds",
        help="comma-separated, some of local_originals,local_thumbnails,remote_originals,"
        "remote_thumbnails,url_previews (default: all)",
    )
    prune.add_argument("--dry-run", action="store_true", help="print what would go; delete nothing")
    prune.add_argument(
        "--batch-size", default="1000", help="objects per re-check and DeleteObjects (max 1000)"
    )
    audit = s3_sub.add_parser(
        "audit", help="read-only: media in neither store nor S3 (lost), and orphaned objects"
    )
    for parser in (prune, audit):
        _common(parser)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _cache_commands(cache: argparse.ArgumentParser) -> None:
    sub = cache.add_subparsers(dest="cache_command", required=True)
    status = sub.add_parser("status", help="size by kind, S3 coverage, access times, budget")
    status.add_argument("--sample", help="check N random files against S3 (default: all)")
    status.add_argument("--no-s3", action="store_true", help="do not ask S3 at all")
    upload = sub.add_parser("upload", help="copy every cached file S3 lacks; never deletes")
    upload.add_argument("--concurrency", default="8", help="files in flight (default 8)")
    upload.add_argument("--dry-run", action="store_true", help="print what would be uploaded")
    evict = sub.add_parser(
        "evict", help="delete least recently accessed files S3 holds, down to a budget"
    )
    evict.add_argument("--max-size", help="the budget, e.g. 50G (default: cache_max_size)")
    evict.add_argument("--min-age", default="1d", help="never evict younger files (default 1d)")
    evict.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    evict.add_argument(
        "--upload-missing", action="store_true", help="upload what S3 lacks, then evict it"
    )
    evict.add_argument("--concurrency", default="8", help="files in flight (default 8)")
    evict.add_argument(
        "--verify-sha256-max",
        default="4M",
        help="read back and hash S3 objects up to SIZE when the DB has a sha256 (0: never)",
    )
    # status reports the budget (cache_max_size); evict's own --max-size defaults to it
    for parser, uses in (
        (status, _CACHE_FLAGS | {"--cache-max-size"}),
        (upload, _CACHE_FLAGS),
        (evict, _CACHE_FLAGS),
    ):
        _common(parser, uses)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        key: getattr(args, key, None)
        for key in (
            "synapse_url",
            "listen",
            "workers",
            "metrics_listen",
            "cache_path",
            "accel_redirect",
            "log_format",
            "cache_max_size",
        )
    }
    return load(
        config_file=args.config,
        synapse_config=args.synapse_config,
        overrides=overrides,
        need_synapse_url=args.command != "cache",
    )


def _cache(args: argparse.Namespace, config: Config) -> int:
    from media_proxy import upkeep
    from media_proxy.evict import Rules

    def count(flag: str, value: str | None, *, minimum: int) -> int | None:
        if value is None:
            return None
        if not value.isdigit() or int(value) < minimum:
            raise ConfigError("command line", flag, f"expected a whole number >= {minimum}")
        return int(value)

    if args.cache_command == "status":
        sample = count("--sample", args.sample, minimum=1)
        return upkeep.run(
            upkeep.run_status(config, sample=sample, as_json=args.json, check_s3=not args.no_s3)
        )
    concurrency = count("--concurrency", args.concurrency, minimum=1) or 1
    if args.cache_command == "upload":
        return upkeep.run(
            upkeep.run_upload(
                config, concurrency=concurrency, dry_run=args.dry_run, as_json=args.json
            )
        )
    if args.max_size is not None:
        max_size = parse_size(args.max_size, source="command line", key="--max-size")
    elif config.cache_max_size is not None:
        max_size = config.cache_max_size
    else:
        raise ConfigError("command line", "--max-size", "required (or cache_max_size in config)")
    rules = Rules(
        min_age=parse_duration(args.min_age, source="command line", key="--min-age"),
        upload_missing=args.upload_missing,
        verify_sha256_max=parse_size(
            args.verify_sha256_max, source="command line", key="--verify-sha256-max"
        ),
        dry_run=args.dry_run,
    )
    return upkeep.run(
        upkeep.run_evict(
            config, max_size=max_size, rules=rules, concurrency=concurrency, as_json=args.json
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "s3":  # configuration as for `cache`, loaded by lifecycle itself
        from media_proxy import lifecycle

        return lifecycle.main(args)
    if args.command == "bench":  # its configuration is optional: loaded by bench itself
        from media_proxy import bench

        return bench.main(args)
    try:
        config = _load(args)
    except ConfigError as e:
        print(f"media-proxy: configuration error: {e}", file=sys.stderr)
        return 2
    logs.configure(config.log_format, config.log_level)
    if args.command == "cache":
        try:
            return _cache(args, config)
        except ConfigError as e:
            print(f"media-proxy: {e.key}: {e.problem}", file=sys.stderr)
            return 2
    if args.command == "check":
        from media_proxy import check

        return asyncio.run(check.run(config))
    from media_proxy import server

    server.main_asyncio_policy()
    return server.serve(config)
