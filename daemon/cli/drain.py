"""``cruised drain [--wait] [--timeout S]`` and ``cruised ready``: take a daemon out of a load balancer and back.

Both send the DRAIN frame (pool/wire/frames.py) on the native socket. While
draining, every door refuses new calls (DRAINING: native ``Draining``, HTTP
503 ``Draining``, q ``'cruised: draining``), ``/readyz`` answers 503 and the
HAProxy agent says ``drain``; queued and running calls finish. ``--wait``
polls the daemon until none is left (exit 0) or ``--timeout`` passes (exit 1,
with what is still in flight): a Kubernetes ``preStop`` hook or a rolling
upgrade script runs ``cruised drain --wait --timeout 100`` and then stops
the daemon. The drain lasts until ``cruised ready`` (a reload keeps it).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from cruised.client.errors import CruisedError

#: seconds between two polls of ``drain --wait``
POLL_INTERVAL = 0.1


def _line(report: dict[str, Any]) -> str:
    return f"{report['state']}: {report['queued']} queued, {report['running']} running"


def cmd_drain(args: argparse.Namespace) -> int:
    from cruised.client.session import Session

    try:
        with Session(socket=args.socket) as s:
            report = s.drain(True)
            if not args.wait:
                print(_line(report))
                return 0
            deadline = time.monotonic() + args.timeout
            while report["queued"] + report["running"] > 0:
                if time.monotonic() >= deadline:
                    print(f"cruised: drain timed out after {args.timeout:g}s: {_line(report)} (still draining)", file=sys.stderr)
                    return 1
                time.sleep(POLL_INTERVAL)
                report = s.drain(None)
                if not report["draining"]:
                    print("cruised: the drain was ended (cruised ready) while waiting", file=sys.stderr)
                    return 1
    except CruisedError as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    print(_line(report))
    return 0


def cmd_ready(args: argparse.Namespace) -> int:
    from cruised.client.session import Session

    try:
        with Session(socket=args.socket) as s:
            report = s.drain(False)
    except CruisedError as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    print(_line(report))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("drain", help="refuse new calls on every door (readyz 503, agent 'drain'); queued and running ones finish")
    p.add_argument("--wait", action="store_true", help="return once no call is queued or running (exit 1 if --timeout passes first)")
    p.add_argument("--timeout", type=_seconds, default=300.0, help="with --wait: seconds to wait at most (default 300)")
    p.set_defaults(func=cmd_drain)

    p = sub.add_parser("ready", help="end a drain: take new calls again")
    p.set_defaults(func=cmd_ready)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value
