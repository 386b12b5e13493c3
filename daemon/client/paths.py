"""Where the sockets live when the config does not say.

The daemon binds (``default_socket``): ``CRUISED_SOCKET`` / ``--socket``, the
config's ``daemon.socket``, then ``$RUNTIME_DIRECTORY`` (systemd's
RuntimeDirectory=), ``/run/cruised`` when /run is writable (root),
``$XDG_RUNTIME_DIR/cruised``, and last a per-user directory under the temp dir.

A client looks (``client_socket``): ``CRUISED_SOCKET``, then the system
daemon's socket ``/run/cruised/cruised.sock`` if one exists there (what the
systemd units create; every member of group ``cruised`` finds it without a
setting), then where a daemon of its own user would bind by the rules above.
So a plain ``cruised serve`` and ``cruised.session()`` meet without any
setting, and so do an installed service and its users. A user who runs a
daemon of their own on a host that also has the system one points clients at
it with ``CRUISED_SOCKET``.

A client on another host names the daemon's remote door (mutual TLS, see
daemon/client/tls.py) with ``session(host=..., port=..., tls=...)`` or with
``CRUISED_ADDRESS=tls://host:port`` plus ``CRUISED_TLS_CERT``,
``CRUISED_TLS_KEY`` and ``CRUISED_TLS_CA`` (``client_address``); when set,
``CRUISED_ADDRESS`` wins over ``CRUISED_SOCKET`` and the defaults
(``unix:///path`` names a Unix socket the same way).
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cruised.client.tls import TLS

SOCKET_NAME = "cruised.sock"
HTTP_SOCKET_NAME = "cruised-http.sock"
#: the system daemon's runtime directory (RuntimeDirectory=cruised in systemd/cruised.service)
SYSTEM_RUNTIME_DIR = "/run/cruised"


def runtime_dir(env: Mapping[str, str] | None = None) -> str:
    """The directory a daemon started with this environment binds its sockets in."""
    env = os.environ if env is None else env
    rd = env.get("RUNTIME_DIRECTORY")
    if rd:
        return rd.split(":")[0]
    if os.access("/run", os.W_OK):
        return SYSTEM_RUNTIME_DIR
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return os.path.join(xdg, "cruised")
    return os.path.join(tempfile.gettempdir(), f"cruised-{os.getuid()}")


def default_socket(configured: str | None = None) -> str:
    """The daemon's native socket: ``CRUISED_SOCKET``, the config's ``daemon.socket``, else in ``runtime_dir()``."""
    env = os.environ.get("CRUISED_SOCKET")
    if env:
        return env
    if configured:
        return configured
    return os.path.join(runtime_dir(), SOCKET_NAME)


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def client_socket(env: Mapping[str, str] | None = None) -> str:
    """Where a client finds the daemon: ``CRUISED_SOCKET``, an existing system socket, else its own user's default."""
    env = os.environ if env is None else env
    explicit = env.get("CRUISED_SOCKET")
    if explicit:
        return explicit
    system = os.path.join(SYSTEM_RUNTIME_DIR, SOCKET_NAME)
    if _is_socket(system):
        return system
    return os.path.join(runtime_dir(env), SOCKET_NAME)


def default_http_socket(native_socket: str, configured: str | None = None) -> str:
    """The HTTP door's Unix socket: ``http.socket``, else ``cruised-http.sock`` beside the native one."""
    if configured:
        return configured
    return os.path.join(os.path.dirname(native_socket) or ".", HTTP_SOCKET_NAME)


@dataclass(frozen=True)
class RemoteAddress:
    """A daemon's remote door: ``tls://host:port`` and the client certificate to show it."""

    host: str
    port: int
    tls: TLS | None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tls://{host}:{self.port}"


def parse_address(text: str, tls: TLS | None = None) -> RemoteAddress | str:
    """``tls://host:port`` -> RemoteAddress; ``unix:///path`` (or a bare path) -> the path; ValueError otherwise."""
    if text.startswith("unix://"):
        return text[len("unix://") :]
    if text.startswith("/"):
        return text
    if not text.startswith("tls://"):
        raise ValueError(f"CRUISED_ADDRESS must be tls://host:port or unix:///path, got {text!r} (the only TCP door is mutual TLS)")
    rest = text[len("tls://") :].rstrip("/")
    if rest.startswith("["):
        host, _, port_text = rest[1:].partition("]:")
    else:
        host, _, port_text = rest.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"CRUISED_ADDRESS must be tls://host:port, got {text!r}")
    return RemoteAddress(host, int(port_text), tls)


def client_address(env: Mapping[str, str] | None = None) -> RemoteAddress | str | None:
    """``CRUISED_ADDRESS`` (with ``CRUISED_TLS_*`` for tls://), or None when it is not set."""
    env = os.environ if env is None else env
    text = env.get("CRUISED_ADDRESS")
    if not text:
        return None
    from cruised.client.tls import TLS

    address = parse_address(text)
    if isinstance(address, RemoteAddress):
        tls = TLS.from_environment(env)
        if tls is None:
            raise ValueError(f"CRUISED_ADDRESS={text} needs CRUISED_TLS_CERT, CRUISED_TLS_KEY and CRUISED_TLS_CA (the remote door is mutual TLS only)")
        return RemoteAddress(address.host, address.port, tls)
    return address
