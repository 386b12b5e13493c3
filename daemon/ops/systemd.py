"""systemd integration without libsystemd: sd_notify(3), socket activation, the watchdog.

Everything here is a no-op unless systemd (or a test standing in for it) set
the environment variables, so ``cruised serve`` in a terminal is unaffected.
The daemon never daemonizes itself: systemd (Type=notify) or the terminal
owns its lifetime.

Notification
    ``$NOTIFY_SOCKET`` names an AF_UNIX datagram socket (a leading ``@`` means
    the abstract namespace). Each message is one datagram of newline-separated
    ``KEY=value`` assignments. The supervisor sends, in this order:
    ``READY=1`` once every pool has ``min`` warm workers; ``STATUS=`` with a
    one-line pool summary whenever it changes (at most once per
    ``STATUS_INTERVAL``); ``RELOADING=1`` with ``MONOTONIC_USEC`` and then
    ``READY=1`` around a reload; ``STOPPING=1`` when shutdown starts.

Watchdog
    With ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID`` absent or ours), a task on
    the supervisor's event loop sends ``WATCHDOG=1`` every half period. Because
    the ping comes from the loop itself, a blocked loop stops the pings and
    systemd restarts the service; the ``healthy`` predicate lets the supervisor
    withhold pings when the loop runs but a part it depends on has died.

Socket activation
    ``$LISTEN_PID`` (must be our pid), ``$LISTEN_FDS`` (count, starting at fd
    3) and ``$LISTEN_FDNAMES`` (colon-separated ``FileDescriptorName=``s). The
    variables are removed after reading, together with the notify and
    watchdog ones, so templates and workers never inherit them: a library in
    a worker must not be able to ping the watchdog on the supervisor's behalf.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, MutableMapping
from typing import Any

log = logging.getLogger("cruised.systemd")

SD_LISTEN_FDS_START = 3
#: STATUS= is re-sent at most this often, and only when the text changed
STATUS_INTERVAL = 1.0
#: longest the loop may block to deliver READY/RELOADING/STOPPING when the manager lags
STATE_SEND_TIMEOUT = 1.0
#: names a socket unit may give the native socket (FileDescriptorName=; the default is the unit name)
NATIVE_FD_NAMES = ("cruised", "native", "cruised.socket")
_OUR_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock sd_notify's MONOTONIC_USEC= refers to."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def notify_address(env: MutableMapping[str, str] = os.environ) -> str | None:
    """The notify socket as an AF_UNIX address, or None when not run by systemd."""
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    if not path.startswith("/"):
        log.warning("ignoring NOTIFY_SOCKET=%s: only AF_UNIX paths are supported", path)
        return None
    return path


def watchdog_interval(env: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is for us."""
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2e6 if value > 0 else None


def listen_fds(env: MutableMapping[str, str] = os.environ) -> list[tuple[str, int]]:
    """(name, fd) of every socket passed by socket activation, in order; [] when none is for us.

    Like sd_listen_fds_with_names(3): the fds are marked close-on-exec so they
    do not leak into the templates.
    """
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if not pid or not count:
        return []
    if pid != str(os.getpid()):
        log.warning("ignoring LISTEN_FDS: LISTEN_PID=%s is not this process (%s)", pid, os.getpid())
        return []
    try:
        n = int(count)
    except ValueError:
        log.warning("ignoring LISTEN_FDS=%r: not an integer", count)
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) and names[i] else "unknown"
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            log.warning("ignoring passed fd %s (%s): %s", fd, name, exc.strerror or exc)
            continue
        out.append((name, fd))
    return out


def clear_environment(env: MutableMapping[str, str] = os.environ) -> None:
    """Forget systemd's variables so child processes do not inherit them."""
    for name in _OUR_VARIABLES:
        env.pop(name, None)


class ActivationError(RuntimeError):
    """A passed file descriptor cannot be used as the native socket."""


def adopt_listener(fd: int, name: str) -> socket.socket:
    """Wrap an inherited fd as a non-blocking listening Unix stream socket, or say why it is not one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ActivationError(f"inherited fd {fd} ({name}) is not a socket: {exc.strerror or exc}") from None
    problem = None
    if sock.family != socket.AF_UNIX:
        problem = f"family {sock.family.name}, expected AF_UNIX"
    elif sock.type != socket.SOCK_STREAM:
        problem = f"type {sock.type.name}, expected SOCK_STREAM (ListenStream=)"
    elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        problem = "it is not listening"
    if problem is not None:
        sock.detach()  # not ours to close: leave the fd as it was
        raise ActivationError(f"inherited fd {fd} ({name}) cannot be the native socket: {problem}")
    sock.setblocking(False)
    return sock


def pick_native(fds: list[tuple[str, int]]) -> tuple[str, int] | None:
    """The fd for the native door: one named in NATIVE_FD_NAMES, else the first AF_UNIX one."""
    for wanted in NATIVE_FD_NAMES:
        for name, fd in fds:
            if name == wanted:
                return name, fd
    for name, fd in fds:
        try:
            probe = socket.socket(fileno=fd)
        except OSError:
            continue
        family = probe.family
        probe.detach()
        if family == socket.AF_UNIX:
            return name, fd
    return None


def activated_sockets(env: MutableMapping[str, str] = os.environ) -> tuple[socket.socket, str, dict[str, socket.socket]] | None:
    """(native listening socket, its address for display, the other passed sockets by name), or None.

    None means no socket activation: the caller binds its own socket.
    """
    fds = listen_fds(env)
    if not fds:
        return None
    chosen = pick_native(fds)
    if chosen is None:
        names = ", ".join(f"{fd} ({name})" for name, fd in fds)
        raise ActivationError(f"socket activation passed no Unix stream socket for the native door: {names}")
    name, fd = chosen
    sock = adopt_listener(fd, name)
    where = sock.getsockname()
    if isinstance(where, bytes):  # abstract namespace
        address = "@" + where[1:].decode(errors="replace")
    else:
        address = where or f"fd {fd}"
    others: dict[str, socket.socket] = {}
    for other, other_fd in fds:
        if other_fd == fd:
            continue
        try:
            extra = socket.socket(fileno=other_fd)
        except OSError:
            log.warning("passed fd %s (%s) is not a socket; ignoring it", other_fd, other)
            continue
        others[other if other not in others else f"{other}:{other_fd}"] = extra
    log.info(
        "socket activation: native door on inherited fd %s (%s) at %s%s",
        fd,
        name,
        address,
        f"; also passed: {', '.join(others)}" if others else "",
    )
    return sock, address, others


class Notifier:
    """The supervisor's side of sd_notify: state messages, throttled STATUS, the watchdog task.

    Built from the environment once, at start; the variables are then removed
    (see the module docstring).
    """

    def __init__(
        self,
        address: str | None,
        watchdog: float | None,
        summary: Callable[[], str],
        healthy: Callable[[], bool],
    ) -> None:
        self.address = address
        self.watchdog = watchdog
        self.summary = summary
        self.healthy = healthy
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_status: str | None = None
        self.stopping = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, summary: Callable[[], str], healthy: Callable[[], bool]) -> Notifier:
        return cls(notify_address(), watchdog_interval(), summary, healthy)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str, state: bool = False) -> bool:
        """One datagram; False if it could not be sent (never raises: systemd may be gone).

        WATCHDOG= and STATUS= are dropped when the manager's queue is full (the
        next one supersedes them); state changes (``state=True``: READY,
        RELOADING, STOPPING) wait up to ``STATE_SEND_TIMEOUT`` for room instead.
        """
        if self._sock is None or self.address is None:
            return False
        data = message.encode()
        try:
            try:
                self._sock.sendto(data, self.address)
            except (BlockingIOError, InterruptedError):
                if not state:
                    log.debug("notify socket full; dropped %r", message.split("\n", 1)[0])
                    return False
                self._sock.settimeout(STATE_SEND_TIMEOUT)
                try:
                    self._sock.sendto(data, self.address)
                finally:
                    self._sock.setblocking(False)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc.strerror or exc)
            return False
        return True

    # -- lifecycle messages --------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sock is not None:
            self._spawn(loop, self._status_loop())
        if self.watchdog is not None:
            if self._sock is None:
                log.warning("WATCHDOG_USEC is set but NOTIFY_SOCKET is not: no watchdog pings")
            else:
                log.info("systemd watchdog: pinging every %.3gs", self.watchdog)
                self._spawn(loop, self._watchdog_loop())

    def ready(self) -> None:
        self._last_status = self.summary()
        self.send(f"READY=1\nSTATUS={self._last_status}", state=True)

    def reloading(self) -> None:
        # sd_notify(3): RELOADING=1 must carry MONOTONIC_USEC so the manager can order it
        self.send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}\nSTATUS=reloading", state=True)

    def stopping_now(self) -> None:
        self.stopping = True
        self._last_status = "stopping: " + self.summary()
        self.send(f"STOPPING=1\nSTATUS={self._last_status}", state=True)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # -- tasks --------------------------------------------------------------------------

    def _spawn(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, None]) -> None:
        task = loop.create_task(coro)
        self._tasks.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self._tasks.discard)

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            text = self.summary()
            if self.stopping:
                text = "stopping: " + text
            if text != self._last_status:
                self._last_status = text
                self.send(f"STATUS={text}")

    async def _watchdog_loop(self) -> None:
        assert self.watchdog is not None
        while True:
            if self.healthy():
                self.send("WATCHDOG=1")
            else:
                log.error("supervisor unhealthy: withholding the systemd watchdog ping")
            await asyncio.sleep(self.watchdog)
