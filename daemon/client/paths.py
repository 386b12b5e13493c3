"""Where the sockets live when the config does not say.

Order: ``CRUISED_SOCKET`` (clients and ``--socket``), the config's
``daemon.socket``, then ``$RUNTIME_DIRECTORY`` (systemd's RuntimeDirectory=),
``/run/cruised`` when /run is writable (root), ``$XDG_RUNTIME_DIR/cruised``,
and last a per-user directory under the temp dir. Daemon and clients use the
same function, so a plain ``cruised serve`` and ``cruised.session()`` meet
without any setting.
"""

from __future__ import annotations

import os
import tempfile

SOCKET_NAME = "cruised.sock"
HTTP_SOCKET_NAME = "cruised-http.sock"


def runtime_dir() -> str:
    rd = os.environ.get("RUNTIME_DIRECTORY")
    if rd:
        return rd.split(":")[0]
    if os.access("/run", os.W_OK):
        return "/run/cruised"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg) and os.access(xdg, os.W_OK):
        return os.path.join(xdg, "cruised")
    return os.path.join(tempfile.gettempdir(), f"cruised-{os.getuid()}")


def default_socket(configured: str | None = None) -> str:
    env = os.environ.get("CRUISED_SOCKET")
    if env:
        return env
    if configured:
        return configured
    return os.path.join(runtime_dir(), SOCKET_NAME)


def default_http_socket(native_socket: str, configured: str | None = None) -> str:
    """The HTTP door's Unix socket: ``http.socket``, else ``cruised-http.sock`` beside the native one."""
    if configured:
        return configured
    return os.path.join(os.path.dirname(native_socket) or ".", HTTP_SOCKET_NAME)
