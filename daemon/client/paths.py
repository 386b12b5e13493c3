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
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Mapping

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
