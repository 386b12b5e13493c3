"""What every door needs from the OS: listening sockets, peer credentials, job ids.

The native, HTTP and q doors all bind Unix or TCP sockets the same way
(a stale Unix socket is replaced, a live daemon's never; a TCP error names
the setting to fix) and number their jobs from one counter, so a job id is
unique across doors in the access log.
"""

from __future__ import annotations

import functools
import itertools
import os
import pwd
import socket
import stat
import struct

_job_ids = itertools.count(1)


def next_job_id() -> int:
    return next(_job_ids)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


@functools.lru_cache(maxsize=1024)
def uid_caller(uid: int) -> str:
    """The caller a peer uid is (daemon/core/fairness.py): its user name, ``uid:<n>`` if it has
    none, ``unknown`` if the kernel did not say. Cached: the user database is read once per uid."""
    if uid < 0:
        return "unknown"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


def peer_caller(sock: socket.socket | None) -> str:
    """``uid_caller`` of the peer of a Unix socket."""
    try:
        return uid_caller(peer_credentials(sock)[1])  # type: ignore[arg-type]  # None: AttributeError below
    except (OSError, AttributeError):
        return "unknown"


def bind_unix(path: str, mode: int) -> socket.socket:
    """Bind a listening Unix socket, removing a stale one but never a live daemon's."""
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(f"{path} exists and is not a socket; refusing to remove it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens
        except OSError as exc:
            raise SocketInUse(f"cannot tell whether {path} is in use: {exc}") from None
        else:
            raise SocketInUse(f"a cruised daemon is already listening on {path}")
        finally:
            probe.close()
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # no window in which the socket has looser permissions
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(512)
    sock.setblocking(False)
    return sock


class SocketInUse(RuntimeError):
    pass


def bind_tcp(host: str, port: int, setting: str) -> socket.socket:
    """A listening TCP socket; errors name ``setting`` (e.g. ``http.listen``) so the operator knows what to fix."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise SocketInUse(f"cannot listen on {host}:{port} ({setting}): {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(512)
    except OSError as exc:
        sock.close()
        raise SocketInUse(f"cannot listen on {host}:{port} ({setting}): {exc.strerror or exc}") from None
    return sock
