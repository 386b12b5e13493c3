"""Command line: ``cruised serve | status | metrics | check-config | call | test | reload | drain | ready | env``.

Exit codes: 0 success, 1 a command ran and reported failure, 2 bad usage or
configuration (including another daemon already on the socket).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from cruised import __version__
from cruised import config as config_mod
from cruised.cli import env as env_cli
from cruised.client import paths
from cruised.client.errors import CruisedError
from cruised.config import ConfigErrors

log = logging.getLogger("cruised")


def _setup_logging(level: str, fmt: str = "text") -> None:
    from cruised.ops import logs

    logs.setup(level, fmt)


def _load(path: str | None) -> config_mod.Config:
    if path is None:
        return config_mod.parse({})
    return config_mod.load(path)


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level, args.log_format)
    from cruised.ops import pid1

    pid1.serve_as_init()  # as a container's pid 1: fork, stay init (daemon/ops/pid1.py); returns in the supervisor
    try:
        cfg = _load(args.config)
    except ConfigErrors as exc:
        for e in exc.errors:
            print(f"cruised: config error: {e}", file=sys.stderr)
        return 2
    from cruised.core.supervisor import Supervisor, run_loop
    from cruised.doors.sockets import SocketInUse
    from cruised.ops.systemd import ActivationError

    socket_path = args.socket or paths.default_socket(cfg.daemon.socket)
    if args.dev and args.config is None:
        print("cruised: --dev watches the config and endpoint code: give it --config", file=sys.stderr)
        return 2

    async def main() -> int:
        sup = Supervisor(cfg, socket_path, config_path=args.config, dev=args.dev)
        return await sup.run()

    try:
        return run_loop(main())
    except (SocketInUse, ActivationError) as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"cruised: cannot create socket {socket_path}: {exc.strerror}", file=sys.stderr)
        return 2


def cmd_metrics(args: argparse.Namespace) -> int:
    from cruised.client.session import Session

    try:
        with Session(socket=args.socket) as s:
            text = s.metrics()
    except CruisedError as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(text)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cruised.client.session import Session

    try:
        st = Session(socket=args.socket).status()
    except CruisedError as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"cruised {st['version']} pid {st['pid']} {st['state']}, up {st['uptime_s']:.0f}s, socket {st['socket']}")
    drain = st.get("drain")
    if st.get("draining") and drain:
        print(f"DRAINING (cruised drain; undo with cruised ready): {drain['queued']} queued, {drain['running']} running")
    agent = st.get("agent")
    if agent:
        print(f"HAProxy agent-check on {agent['listen']} (counts pools {', '.join(agent['pools'])})")
    q = st.get("qipc")
    if q:
        where = f"{q['listen']}{' (TLS)' if q['tls'] else ''}" + (f" and {q['unix']}" if q["unix"] else "")
        print(f"kdb+ IPC on {where}: {q['connections']} handles, logins {q['logins']['ok']} ok / {q['logins']['failed']} refused")
        auth = q.get("auth")
        if auth:
            trust = ", loopback trusted for endpoint calls" if auth["loopback_without_password"] else ""
            print(f"  logins: {auth['users_file'] or 'no users_file (local peers only)'}{trust}; pykx.remote code: {auth['code']}")
    remote = st.get("remote")
    if remote:
        auth = remote["auth"]
        refused = remote["refused"]
        print(
            f"remote door on {remote['listen']} (mutual TLS 1.3, CA {auth['client_ca_file']}): {remote['connections']} connections "
            f"({', '.join(remote['callers']) or 'none'}), refused {refused['handshake']} in the handshake, {refused['not_allowed']} not allowed"
        )
        print(f"  allowed clients: {', '.join(auth['allowed_clients'])}{'; CRL ' + auth['crl_file'] if auth['crl_file'] else ''}")
    h = st.get("http")
    if h and h.get("listen") and h.get("auth", {}).get("tcp"):
        tcp = h["auth"]["tcp"]
        keyed, open_ = ", ".join(tcp["api_keys_for"]) or "none", ", ".join(tcp["no_key_for"]) or "none"
        print(f"HTTP on {h['listen']}: API keys for {keyed}; no key for {open_}")
    header = f"{'pool':<12} {'start':>5} {'idle':>5} {'busy':>5} {'drain':>5} {'queue':>9} {'ok':>8} {'err':>6} {'reject':>7} {'q-tmo':>6} {'x-tmo':>6} {'crash':>6} {'cancel':>6}"
    print(header)
    for name, p in st["pools"].items():
        w, q, r = p["workers"], p["queue"], p["requests"]
        print(
            f"{name:<12} {w['starting']:>5} {w['idle']:>5} {w['busy']:>5} {w['draining'] + w['killing']:>5} "
            f"{q['depth']:>4}/{q['capacity']:<4} {r.get('ok', 0):>8} {r.get('error', 0):>6} {r.get('rejected', 0):>7} "
            f"{r.get('queue_timeout', 0):>6} {r.get('exec_timeout', 0):>6} {r.get('crashed', 0):>6} {r.get('cancelled', 0):>6}"
        )
        if p.get("last_error"):
            print(f"  last error: {p['last_error']}")
        fair = p.get("fairness")
        if fair and (fair["waiting"] or fair["credit"]):
            # who the queue is waiting for (the top callers by depth), and who holds credit for a map
            waits = [f"{c['caller']} {c['waiting']}" for c in fair["waiting"]] + ([f"others {fair['waiting_others']}"] if fair["waiting_others"] else [])
            credit = ", ".join(f"{c['caller']} {c['unspent']}" for c in fair["credit"])
            print(f"  waiting by caller ({fair['mode']}): {', '.join(waits) or 'none'}" + (f"; unspent credit: {credit}" if credit else ""))
        if p.get("env"):
            print(f"  {env_cli.status_line(p['env'])}")  # a code env cruised builds: building, ready or failed
        if p.get("q"):
            qs = p["q"]
            req = ", required" if qs["required"] else ""
            failed = r.get("q_unavailable", 0)
            lost = f", {failed} calls failed on q" if failed else ""
            print(f"  q {qs['endpoint']}: {qs['connected']}/{qs['workers']} workers connected{req}{lost}")
            if qs.get("last_error"):
                print(f"  q last error: {qs['last_error']}")
    from cruised.cli.endpoints import print_endpoints

    print_endpoints(st)
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
    for name, p in cfg.pools.items():
        # not an error: a missing code env fails its own pool only, and may be created before the daemon starts
        if p.python is not None and not os.access(p.python, os.X_OK):
            print(f"{args.file}: warning: pools.{name}.python: {p.python} is not an executable file; that pool will not start", file=sys.stderr)
    if cfg.services:
        print(f"{args.file}: endpoints: {', '.join(cfg.endpoints())}")
    from cruised.doors import access

    exposure = access.http_exposure(cfg)
    if exposure is not None:
        print(f"{args.file}: warning: {exposure}", file=sys.stderr)
    return 0


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """The options every command takes, before or after its name (``cruised --socket P status``
    and ``cruised status --socket P``). The top parser carries the defaults; each command's
    copy has none (``SUPPRESS``): argparse applies a subcommand's defaults to the namespace the
    top parser already filled, so a default there would overwrite a value given before the
    command's name. Given on both sides, the one after the command's name wins."""
    parser.add_argument("--version", action="version", version=f"cruised {__version__}")
    parser.add_argument(
        "--socket",
        default=os.environ.get("CRUISED_SOCKET") if defaults else argparse.SUPPRESS,
        help="native socket of the daemon (default: $CRUISED_SOCKET, the config, or the runtime dir)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cruised", description="A warm pool of Python workers for kdb+ teams.")
    _global_options(parser, defaults=True)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the daemon in the foreground (logs to stderr)")
    p.add_argument("--config", "-c", help="YAML configuration file")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--dev", action="store_true", help="reload whenever the config or endpoint code changes, printing the result")
    p.add_argument("--log-format", default="text", choices=["text", "json"], help="text lines, or one JSON object per line")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="pools, workers, queues and counts of a running daemon")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("metrics", help="print the daemon's Prometheus metrics (what GET /metrics serves)")
    p.set_defaults(func=cmd_metrics)

    p = sub.add_parser("check-config", help="validate a configuration file and exit")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    from cruised.cli import endpoints as endpoints_cli

    endpoints_cli.add_commands(sub)
    from cruised.cli import drain as drain_cli

    drain_cli.add_commands(sub)  # cruised drain [--wait] [--timeout S] | ready
    env_cli.add_commands(sub)  # cruised env build | list | prune
    for command in _commands(parser):
        _global_options(command, defaults=False)
    return parser


def _commands(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every command's parser, nested ones too (``env build``), aliases once."""
    found: dict[int, argparse.ArgumentParser] = {}
    for action in parser._actions:  # argparse keeps its subparsers private
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                if id(command) not in found:
                    found[id(command)] = command
                    found.update((id(c), c) for c in _commands(command))
    return list(found.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args: Any = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
