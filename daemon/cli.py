"""Command line: ``cruised serve | status | check-config``.

Exit codes: 0 success, 1 a command ran and reported failure, 2 bad usage or
configuration (including another daemon already on the socket).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import Any, Sequence

from . import __version__, config as config_mod, paths
from .config import ConfigErrors
from .errors import CruisedError

log = logging.getLogger("cruised")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _load(path: str | None) -> config_mod.Config:
    if path is None:
        return config_mod.parse({})
    return config_mod.load(path)


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    try:
        cfg = _load(args.config)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(f"cruised: config error: {e}", file=sys.stderr)
        return 2
    from .server import SocketInUse
    from .supervisor import Supervisor, run_loop

    socket_path = args.socket or paths.default_socket(cfg.daemon.socket)

    async def main() -> int:
        sup = Supervisor(cfg, socket_path)
        return await sup.run()

    try:
        return run_loop(main())
    except SocketInUse as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"cruised: cannot create socket {socket_path}: {exc.strerror}", file=sys.stderr)
        return 2


def cmd_status(args: argparse.Namespace) -> int:
    from .client import Session

    try:
        st = Session(socket=args.socket).status()
    except CruisedError as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"cruised {st['version']} pid {st['pid']} {st['state']}, up {st['uptime_s']:.0f}s, socket {st['socket']}")
    header = f"{'pool':<12} {'start':>5} {'idle':>5} {'busy':>5} {'drain':>5} {'queue':>9} {'ok':>8} {'err':>6} {'reject':>7} {'q-tmo':>6} {'x-tmo':>6} {'crash':>6}"
    print(header)
    for name, p in st["pools"].items():
        w, q, r = p["workers"], p["queue"], p["requests"]
        print(
            f"{name:<12} {w['starting']:>5} {w['idle']:>5} {w['busy']:>5} {w['draining'] + w['killing']:>5} "
            f"{q['depth']:>4}/{q['capacity']:<4} {r.get('ok', 0):>8} {r.get('error', 0):>6} {r.get('rejected', 0):>7} "
            f"{r.get('queue_timeout', 0):>6} {r.get('exec_timeout', 0):>6} {r.get('crashed', 0):>6}"
        )
        if p.get("last_error"):
            print(f"  last error: {p['last_error']}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.file)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(f"{args.file}: {e}", file=sys.stderr)
        return 2
    pools = ", ".join(f"{n} (min {p.min} / cruise {p.cruise} / max {p.max}, queue {p.queue_size})" for n, p in cfg.pools.items())
    print(f"{args.file}: ok; pools: {pools}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cruised", description="A warm pool of Python workers for kdb+ teams.")
    parser.add_argument("--version", action="version", version=f"cruised {__version__}")
    parser.add_argument("--socket", default=os.environ.get("CRUISED_SOCKET"), help="native socket of the daemon (default: $CRUISED_SOCKET, the config, or the runtime dir)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the daemon in the foreground (logs to stderr)")
    p.add_argument("--config", "-c", help="YAML configuration file")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="pools, workers, queues and counts of a running daemon")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
