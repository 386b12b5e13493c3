"""Who may use the kdb+ IPC door: q's ``-U`` password file, loopback trust, endpoint user lists.

The handshake carries ``user:password`` (or just ``user``, as q's own
``hopen`` sends when there is no password). The decision, made once per
connection before the capability byte is answered::

    peer on loopback or the Unix socket, no password sent,
    qipc.allow_loopback_without_password            -> in, as the user it names (LOOPBACK)
    users_file set                                  -> in if user:password matches a line (PASSWORD)
    no users_file                                   -> in only from loopback / the Unix socket (LOCAL)

How a connection got in decides what it may run. Endpoint calls: any login.
Code (pykx.remote functions and library imports: arbitrary Python in a
worker, as the workers' user, with their q connections) only where
``qipc.remote_functions`` is on, and then only for a PASSWORD login, or on
the abstract Unix socket for a peer whose uid or gid (SO_PEERCRED) is in
``daemon.allow_uids`` / ``allow_gids``, the native door's allowlist (with
both empty: the daemon's own uid, since an abstract socket has no file mode
to keep others out). Loopback trust never covers code: any local user can
reach a loopback port.

A rejected login is closed without a byte, which is what q does when
``.z.pw`` says no: q clients see ``'access``, pykx ``Authentication error``.

The file is q's ``-U`` format (code.kx.com/q/basics/cmdline/#-u-usr-pwd): one
``user:password`` per line; the password is plain text, or the MD5 (32 hex
digits) or SHA-1 (40 hex digits) of the password, so a plain password that
looks like such a digest cannot be written plain. Blank lines and lines
starting with ``#`` are skipped. The file is re-read when its modification
time or size changes, so adding a user needs no restart; a file that became
unreadable keeps the last good table (and says so in the log).

Per-endpoint lists (``qipc.endpoint_users``) are checked per call and answer
``'access: <endpoint>``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cruised.config import QipcConfig

log = logging.getLogger("cruised.qipc")

_MD5 = re.compile(r"[0-9a-fA-F]{32}")
_SHA1 = re.compile(r"[0-9a-fA-F]{40}")


class UsersFileError(ValueError):
    """The password file cannot be read or has a malformed line (message names the line)."""


def read_users_file(path: str) -> dict[str, str]:
    """``user -> stored password`` from a ``-U`` file."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise UsersFileError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsersFileError(f"{path} is not UTF-8 text") from None
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        user, sep, stored = text.partition(":")
        if not sep or not user:
            # never echo the line: it may hold a password
            raise UsersFileError(f"{path} line {number}: expected user:password")
        users[user] = stored
    return users


def password_matches(stored: str, given: str) -> bool:
    """Constant-time check of ``given`` against a plain, MD5 or SHA-1 stored password."""
    if _MD5.fullmatch(stored):
        expected, actual = stored.lower().encode(), hashlib.md5(given.encode()).hexdigest().encode()
    elif _SHA1.fullmatch(stored):
        expected, actual = stored.lower().encode(), hashlib.sha1(given.encode()).hexdigest().encode()
    else:
        expected, actual = stored.encode(), given.encode()
    return hmac.compare_digest(expected, actual)


def is_loopback(peer: object) -> bool:
    """A TCP peer address on loopback; Unix-socket peers are checked by the caller."""
    if isinstance(peer, tuple) and peer:
        try:
            return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
        except ValueError:
            return False
    return False


#: how a connection logged in (``Authenticator.login``)
PASSWORD = "password"  # user:password matched a line of users_file
LOOPBACK = "loopback"  # a local peer with no password, let in by allow_loopback_without_password
LOCAL = "local"  # a local peer, no users_file to check a password against


def peer_may_run_code(uid: int, gid: int, allow_uids: list[int], allow_gids: list[int], own_uid: int) -> bool:
    """The abstract Unix socket's alternative to a password for code: the native door's allowlist."""
    if allow_uids or allow_gids:
        return uid in allow_uids or gid in allow_gids
    return uid == own_uid


class Authenticator:
    def __init__(self, cfg: QipcConfig) -> None:
        self.path = cfg.users_file
        self.loopback_free = cfg.allow_loopback_without_password
        self.endpoint_users = {name: frozenset(users) for name, users in cfg.endpoint_users.items()}
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int] | None = None
        if self.path is not None:
            self._users = read_users_file(self.path)
            self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _refresh(self) -> None:
        if self.path is None:
            return
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            self._users = read_users_file(self.path)
        except UsersFileError as exc:
            log.error("qipc.users_file: %s; keeping the %d users read before", exc, len(self._users))
        else:
            log.info("qipc.users_file re-read: %d users", len(self._users))
        self._stamp = stamp

    def login(self, user: str, password: str, local: bool) -> str | None:
        """How this handshake gets in (PASSWORD, LOOPBACK or LOCAL), or None. ``local`` = loopback TCP or the Unix socket."""
        if local and not password and self.loopback_free:
            return LOOPBACK
        if self.path is None:
            return LOCAL if local else None
        self._refresh()
        stored = self._users.get(user)
        if stored is None:
            password_matches(password, password)  # the same work as for a known user
            return None
        return PASSWORD if password_matches(stored, password) else None

    def may_call(self, user: str, endpoint: str) -> bool:
        allowed = self.endpoint_users.get(endpoint)
        return allowed is None or user in allowed
