"""Command line for endpoints: ``cruised call``, ``cruised test``, ``cruised reload``.

``call`` and ``test`` use the HTTP door, exactly as any other client would:
by default its Unix socket, found by asking the daemon on the native socket
(so one ``--socket`` / ``CRUISED_SOCKET`` setting serves every command), or
``--url http://host:port`` with ``--api-key`` for TCP. ``reload`` sends a
RELOAD frame on the native socket and waits for the new generation.

Exit codes: 0 success; 1 the call failed, a test query failed or the reload
was refused (the error JSON or message on stderr); 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cruised.client.errors import CruisedError
from cruised.client.http import Response, Target, request, run_path

PREVIEW = 60


class UsageError(Exception):
    pass


def add_commands(sub: Any) -> None:
    def http_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=os.environ.get("CRUISED_HTTP"), help="the HTTP door: http://host:port or a Unix socket path (default: ask the daemon)")
        p.add_argument("--api-key", default=os.environ.get("CRUISED_API_KEY"), help="API key for services that need one over TCP (default: $CRUISED_API_KEY)")
        p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer")

    p = sub.add_parser("call", help="call an endpoint with a JSON body and print its response")
    p.add_argument("endpoint", metavar="SERVICE/ENDPOINT")
    p.add_argument("--data", "-d", default="{}", help="the JSON body; @FILE reads a file, - reads stdin (default {})")
    p.add_argument("--full", action="store_true", help="print the whole answer, timing included")
    http_options(p)
    p.set_defaults(func=cmd_call)

    p = sub.add_parser("test", help="play the endpoints' test_queries against the running daemon")
    p.add_argument("which", nargs="?", metavar="SERVICE[/ENDPOINT]", help="only this service or endpoint")
    http_options(p)
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("reload", help="re-read the config and endpoint code; a new generation takes over once warm")
    p.set_defaults(func=cmd_reload)


def http_target(args: argparse.Namespace) -> Target:
    if args.url:
        return Target.parse(args.url, args.api_key)
    from cruised.client.session import Session

    try:
        with Session(socket=args.socket) as s:
            st = s.status()
    except CruisedError as exc:
        raise UsageError(str(exc)) from None
    http = st.get("http") or {}
    if not http.get("socket"):
        raise UsageError("the daemon's HTTP door is off (http.enabled: false)")
    return Target(unix=http["socket"], api_key=args.api_key)


def _body(data: str) -> bytes:
    if data == "-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as fh:
                return fh.read()
        except OSError as exc:
            raise UsageError(f"cannot read {data[1:]}: {exc.strerror}") from None
    return data.encode()


def _split(name: str) -> tuple[str, str]:
    service, _, endpoint = name.partition("/")
    if not service or not endpoint or "/" in endpoint:
        raise UsageError(f"expected SERVICE/ENDPOINT, got {name!r}")
    return service, endpoint


def _envelope(resp: Response) -> dict[str, Any] | None:
    """The standard ``{"response", "timing"}`` answer, or None for an endpoint's custom response."""
    if not resp.is_json:
        return None
    try:
        obj = resp.json()
    except ValueError:
        return None
    if isinstance(obj, dict) and set(obj) == {"response", "timing"}:
        return obj
    return None


def cmd_call(args: argparse.Namespace) -> int:
    try:
        service, endpoint = _split(args.endpoint)
        body = _body(args.data)
    except UsageError as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 2
    try:
        target = http_target(args)
    except (UsageError, ValueError) as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    try:
        resp = request(target, "POST", run_path(service, endpoint), body, timeout=args.timeout)
    except OSError as exc:
        print(f"cruised: cannot reach the HTTP door at {target.describe()}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if not 200 <= resp.status < 300:
        sys.stderr.write(resp.body.decode("utf-8", "replace").rstrip("\n") + "\n")
        return 1
    env = _envelope(resp)
    if env is not None:
        shown = env if args.full else env["response"]
        print(json.dumps(shown, indent=2, ensure_ascii=False))
    else:
        sys.stdout.buffer.write(resp.body)
        if resp.body and not resp.body.endswith(b"\n") and sys.stdout.isatty():
            sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _preview(resp: Response) -> str:
    if resp.is_json:
        try:
            obj = resp.json()
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "errorType" in obj and resp.status >= 400:
            text = f"{obj['errorType']}: {obj.get('message', '')}"
        elif isinstance(obj, dict) and set(obj) == {"response", "timing"}:
            text = json.dumps(obj["response"], ensure_ascii=False)
        else:
            text = json.dumps(obj, ensure_ascii=False)
    else:
        text = f"<{resp.headers.get('content-type', 'no content type')}, {len(resp.body)} bytes>"
    text = " ".join(text.split())
    return text if len(text) <= PREVIEW else text[: PREVIEW - 3] + "..."


def cmd_test(args: argparse.Namespace) -> int:
    try:
        target = http_target(args)
        st = request(target, "GET", "/status", timeout=args.timeout)
    except (UsageError, ValueError) as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cruised: cannot reach the HTTP door: {exc.strerror or exc}", file=sys.stderr)
        return 1
    if st.status != 200:
        sys.stderr.write(st.body.decode("utf-8", "replace") + "\n")
        return 1
    services: dict[str, Any] = st.json().get("services") or {}
    want_service, _, want_endpoint = (args.which or "").partition("/")
    selected = [
        (sname, ename, ed)
        for sname, sd in services.items()
        for ename, ed in sd["endpoints"].items()
        if (not want_service or sname == want_service) and (not want_endpoint or ename == want_endpoint)
    ]
    if not selected:
        known = ", ".join(f"{s}/{e}" for s, sd in services.items() for e in sd["endpoints"]) or "none"
        print(f"cruised: no endpoint matches {args.which!r} (endpoints: {known})", file=sys.stderr)
        return 1
    rows: list[tuple[str, str, str, str, str]] = []
    passed = failed = 0
    for sname, ename, ed in selected:
        name = f"{sname}/{ename}"
        queries = ed.get("test_queries") or []
        if not queries:
            rows.append((name, "-", "-", "-", "no test_queries configured"))
            continue
        for i, query in enumerate(queries, 1):
            try:
                resp = request(target, "POST", run_path(sname, ename), json.dumps(query).encode(), timeout=args.timeout)
            except OSError as exc:
                failed += 1
                rows.append((name, str(i), "-", "-", f"cannot reach the HTTP door: {exc.strerror or exc}"))
                continue
            if 200 <= resp.status < 300:
                passed += 1
            else:
                failed += 1
            rows.append((name, str(i), str(resp.status), f"{resp.elapsed_ms:.1f}ms", _preview(resp)))
    header = ("endpoint", "query", "status", "time", "result")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(widths[c]) if c < 4 else cell for c, cell in enumerate(row)).rstrip())
    print(f"{passed} ok, {failed} failed")
    return 1 if failed else 0


def cmd_reload(args: argparse.Namespace) -> int:
    from cruised.client.session import Session

    try:
        with Session(socket=args.socket) as s:
            ok, message = s.reload()
    except CruisedError as exc:
        print(f"cruised: {exc}", file=sys.stderr)
        return 1
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def print_endpoints(st: dict[str, Any]) -> None:
    """The endpoints part of ``cruised status``."""
    http = st.get("http") or {}
    if http:
        print(f"http: {http.get('socket')}" + (f" and {http['listen']}" if http.get("listen") else "") + f"; generation {st.get('generation')}")
    services = st.get("services") or {}
    rows = [
        (f"{s}/{e}", ed["pool"], ed["state"] + (f": {ed['error']}" if ed.get("error") else ""))
        for s, sd in services.items()
        for e, ed in sd["endpoints"].items()
    ]
    if not rows:
        return
    w0 = max(len("endpoint"), *(len(r[0]) for r in rows))
    w1 = max(len("pool"), *(len(r[1]) for r in rows))
    print(f"{'endpoint':<{w0}}  {'pool':<{w1}}  state")
    for name, pool, state in rows:
        print(f"{name:<{w0}}  {pool:<{w1}}  {state}")
