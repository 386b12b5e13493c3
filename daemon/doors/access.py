"""How each door authenticates, in words: one source for the start-up log, ``status`` and ``check-config``.

An operator must be able to read, without opening the code, who can reach a
door and what they may run there. Every TCP door says so when it starts (one
INFO line each) and in ``cruised status`` / ``GET /status``; an HTTP door
bound beyond loopback that serves a service without ``api_keys`` starts with
a WARNING naming those services, and ``cruised check-config`` prints the same
warning before anything is started.

What may run where (docs/operations.md has the table): endpoint calls on any
door that lets the caller in; shipped code (cruised functions, pykx.remote)
only on the native Unix socket (its file mode and peer allowlist) and, opted
in with ``qipc.remote_functions``, on the q door after a password login or
from an allowed peer uid on its abstract Unix socket. The HTTP door has no
route for code at all.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from cruised.config import Config, parse_listen


def is_loopback_host(host: str) -> bool:
    """A listen host that only this machine can reach (``localhost``, 127.0.0.0/8, ::1); any other name counts as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def keyless_services(cfg: Config) -> list[str]:
    """Services anyone who reaches the HTTP TCP door may call (no ``api_keys`` / ``api_keys_file``)."""
    return sorted(name for name, svc in cfg.services.items() if not (svc.api_keys or svc.api_keys_file))


def http_exposure(cfg: Config) -> str | None:
    """The warning for an HTTP TCP door beyond loopback with keyless services, else None."""
    if not (cfg.http.enabled and cfg.http.listen):
        return None
    host, _ = parse_listen(cfg.http.listen)
    open_services = keyless_services(cfg)
    if is_loopback_host(host) or not open_services:
        return None
    return (
        f"http.listen {cfg.http.listen} is reachable beyond this host and services {', '.join(open_services)} have no api_keys: "
        "anyone who can reach that address may call their endpoints"
    )


def http_auth(cfg: Config) -> dict[str, Any]:
    """The HTTP door's access rules, for ``status`` (per site)."""
    d = cfg.daemon
    keyed = sorted(set(cfg.services) - set(keyless_services(cfg)))
    return {
        "unix": {"socket_mode": oct(d.socket_mode), "allow_uids": list(d.allow_uids), "allow_gids": list(d.allow_gids)},
        "tcp": {"api_keys_for": keyed, "no_key_for": keyless_services(cfg)} if cfg.http.listen else None,
        "code": "never (the HTTP door has no route for shipped functions)",
        "probes": "/livez, /healthz, /readyz: no key (they say only whether the daemon runs and takes calls)",
    }


def agent_line(address: str) -> str:
    """The HAProxy agent's start-up line: what anyone who reaches it gets."""
    return f"haproxy agent-check on {address} (TCP, no auth): one line of state (up ready maxconn:N / drain / down) per connection; reads nothing, runs nothing"


def http_line(cfg: Config, address: str) -> str:
    open_services = keyless_services(cfg)
    keyed = sorted(set(cfg.services) - set(open_services))
    parts = [f"API keys for {', '.join(keyed)}" if keyed else "", f"no key for {', '.join(open_services)}" if open_services else ""]
    rules = "; ".join(p for p in parts if p) or "no services"
    return f"http door on {address} (TCP, plain HTTP): endpoint calls with {rules}; no shipped code"


def qipc_code_rule(cfg: Config) -> str:
    q = cfg.qipc
    if not q.remote_functions:
        return "off (qipc.remote_functions: false)"
    ways = []
    if q.users_file:
        ways.append("password logins from the users file")
    if q.unix:
        ways.append("peers on the Unix socket whose uid is allowed (daemon.allow_uids/allow_gids, else the daemon's own uid)")
    return "on, for " + " or ".join(ways) if ways else "on, but no login can use it (no users_file, no Unix socket)"


def qipc_auth(cfg: Config) -> dict[str, Any]:
    """The q door's access rules, for ``status``."""
    q = cfg.qipc
    return {
        "users_file": q.users_file,
        "loopback_without_password": q.allow_loopback_without_password,
        "tls": bool(q.tls_cert),
        "remote_functions": q.remote_functions,
        "code": qipc_code_rule(cfg),
    }


def qipc_line(cfg: Config, address: str) -> str:
    q = cfg.qipc
    logins = f"logins checked against {q.users_file}" if q.users_file else "no users_file: loopback and Unix-socket peers only"
    trust = "; loopback peers without a password trusted for endpoint calls" if q.allow_loopback_without_password else ""
    tls = "TLS" if q.tls_cert else "plain"
    return f"qipc door on {address} (TCP, {tls}): {logins}{trust}; pykx.remote code: {qipc_code_rule(cfg)}"
