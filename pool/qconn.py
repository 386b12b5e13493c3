"""The worker's kdb+ connection: the ``q`` global, reconnecting with bounded backoff.

A pool with a ``q:`` section gives each worker one :class:`QHandle`, bound as
``q`` in the worker's base namespace before the init file runs, so init code,
shipped functions and endpoint modules all call the same object::

    q('select from trade where sym=`AAPL')      # -> pykx.Table
    q('{x+y}', 1, 2)                             # -> pykx.LongAtom

Data flow::

    user code --q(query, *args)--> QHandle --(one pykx.SyncQConnection)--> q process
                                      |
                                      +-- state changes --> worker loop --STATE frame--> supervisor

Connection life
    The worker connects once, after preload and before it says READY; a q that
    is down never fails the worker: it goes READY disconnected and reports so.
    The connection is then held for the worker's whole life. When it is lost
    (q restarted, network cut, reply timed out), the handle closes it and
    reconnects before the next use. While the worker is idle it also watches
    the connection (an EOF from q is noticed at once, not at the next call) and
    keeps reconnecting in the background, so ``cruised status`` shows an outage
    and its recovery without any call being made.

Backoff
    Failed connects wait ``reconnect.initial`` and then double up to
    ``reconnect.max``; a call made while waiting fails at once with
    :class:`QConnectionError` instead of hammering q. Rejected credentials
    back off the same way (a clear error naming the user and endpoint, never a
    tight loop). A connection lost during a query, or one that had proved
    itself (a query succeeded on it, or it stayed up for ``reconnect.max``),
    is re-opened at the next use or at once in the background; one that
    drops by itself before it ever worked counts as a failed connect, so a q
    that accepts and then hangs up cannot make the worker spin.

At-most-once
    A query is never re-sent. pykx can reconnect by itself
    (``reconnection_attempts``), but it then re-sends the query that failed,
    so a non-idempotent query (an insert, a counter) could run twice; and a
    query that makes q drop the connection would be re-sent in a loop. We pass
    ``reconnection_attempts=-1`` (off) and reconnect ourselves: if the
    connection breaks during a query, that call raises QConnectionError (the
    query may or may not have run on q) and only the *next* call reconnects.
    A reply timeout drops the connection too, because pykx would otherwise
    make the next query wait for the late reply first.

Why ``no_ctx=True``
    Without it pykx sends q-specific context probes on connect (it evaluates
    q code to learn the server's namespaces). A peer that is not a full q,
    such as a gateway, a proxy, or ``tests/support/qserver.py``, answers them with an
    error and the constructor fails. The probes only serve pykx's
    ``conn.namespace.function`` attribute syntax, which the ``q`` global does
    not offer; ``q('query', *args)`` needs none of it.

pykx import and licence
    pykx is imported lazily, and only in pools that have ``q:`` (the template
    imports it before forking, so workers get it for free). A worker is never
    interactive (stdin is /dev/null, no ``sys.ps1``), so pykx never shows its
    licence prompt; :func:`pykx_environment` additionally pins unlicensed mode
    (IPC only, the fast import) unless the operator chose a mode. See
    docs/kdb.md.

Fork safety
    A connection belongs to the worker process that opened it. If user code
    forks, the child must not use (or close) the parent's socket; the handle
    refuses to work in a process other than its owner.

This module must not import anything from the daemon side (``cruised``).
"""

from __future__ import annotations

import inspect
import json
import os
import select
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

#: pykx's message for a reply timeout (pykx.ipc._ipc_err_warning['timeout'])
_PYKX_TIMEOUT = "Query timed out"
#: how libe's QErrors say the handle is dead (TLS connections); the same test pykx's own
#: SecureQConnection uses to decide to reconnect
_DEAD_HANDLE = ("snd handle", "write to handle", "close handle", "rcv handle")


class QConnectionError(Exception):
    """q could not be reached, or the connection broke during the query.

    When it is raised from a query, the query may or may not have run on q: it
    is never re-sent. The next use of ``q`` reconnects (after the backoff, if
    connecting failed). A function that lets this propagate fails with
    ``cruised.QConnectionError`` in the client (HTTP 502, errorType
    ``QConnectionError``).
    """


@dataclass(frozen=True)
class QSettings:
    """What a worker needs to connect; built from ``QConfig.worker_spec`` (daemon/config.py)."""

    port: int
    host: str = "127.0.0.1"
    username: str = ""
    password: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_verify: bool = True
    timeout: float = 60.0
    connect_timeout: float = 5.0
    unix: bool = False
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    required: bool = False

    @classmethod
    def from_spec(cls, raw: Mapping[str, Any]) -> QSettings:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})

    def __repr__(self) -> str:  # the password must not reach a log line through a repr
        return f"QSettings(endpoint={self.endpoint!r}, username={self.username!r})"

    @property
    def endpoint(self) -> str:
        return f"unix:/tmp/kx.{self.port}" if self.unix else f"{self.host}:{self.port}"

    def user_text(self) -> str:
        return f"user {self.username!r}" if self.username else "the empty user name"


def pykx_environment(env: Mapping[str, str]) -> dict[str, str]:
    """The environment a pool's processes get, so that importing pykx never blocks or chatters.

    The operator's choice wins: if ``PYKX_LICENSED``, ``PYKX_UNLICENSED`` or a
    ``--licensed``/``--unlicensed`` in ``QARGS`` is set (daemon environment or
    ``pools.<name>.env``), nothing is changed; setting both modes would make
    the pykx import fail. Otherwise unlicensed mode is pinned: IPC needs no
    licence, the import skips the licensed-q probe, and a missing or expired
    licence cannot turn into a prompt or a warning. ``PYKX_SUPPRESS_WARNINGS``
    keeps pykx's import-time warnings out of the worker logs unless the
    operator set it.
    """
    out = dict(env)
    qargs = out.get("QARGS", "")
    chosen = any(k in out for k in ("PYKX_LICENSED", "PYKX_UNLICENSED")) or "licensed" in qargs
    if not chosen:
        out["PYKX_UNLICENSED"] = "true"
    out.setdefault("PYKX_SUPPRESS_WARNINGS", "true")
    return out


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


class QHandle:
    """The ``q`` global: call it like a pykx connection; it keeps one open for the worker.

    ``q(query, *args, wait=True)`` returns a pykx object (``.py()``, ``.np()``,
    ``.pd()``). pykx's own errors pass through unchanged (``pykx.QError`` for
    an error q sends back, TypeError for too many arguments, ...); only a
    missing or broken connection becomes :class:`QConnectionError`, also
    reachable as ``q.QConnectionError`` for ``except`` clauses in shipped code.

    The constructor does no I/O; :meth:`try_connect` makes the first attempt.
    ``connect`` and ``clock`` are ports for the unit tests (a fake q and a fake
    monotonic clock); by default they are pykx and ``time.monotonic``.
    """

    QConnectionError = QConnectionError

    def __init__(
        self,
        settings: QSettings | Mapping[str, Any],
        *,
        connect: Callable[..., Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings if isinstance(settings, QSettings) else QSettings.from_spec(settings)
        self._connect = connect or self._pykx_connect
        self._clock = clock
        self._conn: Any = None
        self._owner = os.getpid()
        self._secret: str | None = self.settings.password  # known now; file/env ones once read
        self._failures = 0  # consecutive failed connects and unproven connections lost
        self._next_attempt = 0.0
        self._connected_at = 0.0
        self._proven = False  # a query succeeded on the current connection
        self._watching = True  # idle EOF watch (off after unsolicited data, until the next query)
        self.last_error: str | None = None
        self._reported: dict[str, Any] | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<cruised q handle {self.settings.endpoint} {state}>"

    # -- the public surface ------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._conn is not None and not getattr(self._conn, "closed", False)

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint

    def __call__(self, query: Any, *args: Any, **kwargs: Any) -> Any:
        conn = self._ensure()
        try:
            result = conn(query, *args, **kwargs)
        except BaseException as exc:
            lost = self._lost_reason(conn, exc)
            if lost is None:
                raise  # q's own error, or a bad argument: the connection is fine
            self._drop(lost, during_query=True)
            if not isinstance(exc, Exception):
                raise  # KeyboardInterrupt and friends keep their meaning
            raise QConnectionError(lost) from exc
        self._proven = True
        self._failures = 0
        self._watching = True  # pykx has read whatever q had sent before our reply
        return result

    def connect(self) -> None:
        """Connect now if not connected (ignoring the backoff); raise QConnectionError on failure."""
        self._check_owner()
        if not self.connected:
            self._open()

    def close(self) -> None:
        """Close the connection; the next use opens a new one."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a dead connection may fail; it is gone either way
                pass

    # -- worker integration ----------------------------------------------------------------

    def try_connect(self) -> bool:
        """The eager first connect (and background retries): never raises because q is down."""
        try:
            self.connect()
        except QConnectionError:
            return False
        return True

    def state(self) -> dict[str, Any]:
        """``{"connected": bool, "error": str | None}``, the shape of the STATE frame's ``q`` value."""
        return {"connected": self.connected, "error": self.last_error}

    def take_change(self) -> dict[str, Any] | None:
        """The state if it changed since the last call (the worker sends it in a STATE frame)."""
        st = self.state()
        if st == self._reported:
            return None
        self._reported = st
        return st

    def idle(self, channel: socket.socket, report: Callable[[], None]) -> None:
        """Block until ``channel`` is readable; meanwhile keep q connected.

        Called by the worker loop instead of blocking in ``recv``: while the
        connection is down it retries on the backoff schedule; while it is up
        it watches the socket, so q closing it is noticed (and reported) at
        once. ``report`` is called after every state change.
        """
        while True:
            report()
            fds: list[Any] = [channel]
            timeout: float | None = None
            qfd = -1
            if not self.connected:
                if self._conn is not None:
                    self._drop("the connection was closed")
                    continue
                timeout = max(0.0, self._next_attempt - self._clock())
                if timeout == 0.0:
                    self.try_connect()
                    continue
            elif self._watching:
                qfd = self._fileno()
                if qfd >= 0:
                    fds.append(qfd)
            try:
                ready, _, _ = select.select(fds, [], [], timeout)
            except (OSError, ValueError):
                if qfd < 0:
                    raise  # the worker's own channel is broken: not ours to paper over
                self._drop("the connection was closed")  # the q fd went away under us
                continue
            if channel in ready:
                return
            if qfd >= 0 and qfd in ready:
                self._check_idle_socket(qfd)

    # -- internals ----------------------------------------------------------------------------

    def _check_owner(self) -> None:
        if os.getpid() != self._owner:
            raise QConnectionError("the q connection belongs to the worker process; a forked child cannot use it (open its own pykx connection)")

    def _ensure(self) -> Any:
        self._check_owner()
        if self.connected:
            return self._conn
        if self._conn is not None:  # pykx closed it (it noticed the loss itself)
            self._drop("the connection was closed")
        wait = self._next_attempt - self._clock()
        if wait > 0:
            raise QConnectionError(f"q at {self.endpoint} is unavailable ({self.last_error}); next connection attempt in {wait:.1f}s")
        return self._open()

    def _open(self) -> Any:
        s = self.settings
        try:
            password = self._password()
            conn = self._connect(s, password)
        except QConnectionError as exc:
            self._failed(str(exc))
            raise
        except Exception as exc:  # noqa: BLE001 - pykx raises several types; all mean "not connected"
            self._failed(self._connect_error(exc))
            raise QConnectionError(self.last_error) from None
        self._conn = conn
        self._connected_at = self._clock()
        self._proven = False
        self._watching = True
        self.last_error = None
        return conn

    def _password(self) -> str:
        s = self.settings
        if s.password_file is not None:
            try:
                with open(s.password_file, encoding="utf-8") as fh:
                    first = fh.readline()
            except OSError as exc:
                raise QConnectionError(f"cannot read q.password_file {s.password_file}: {exc.strerror or exc}") from None
            self._secret = first.rstrip("\r\n")
        elif s.password_env is not None:
            value = os.environ.get(s.password_env)
            if value is None:
                raise QConnectionError(f"environment variable {s.password_env} (q.password_env) is not set")
            self._secret = value
        else:
            self._secret = s.password
        return self._secret or ""

    def _connect_error(self, exc: BaseException) -> str:
        text = _scrub(str(exc), self._secret)
        low = text.lower()
        if "authentication" in low or low.startswith("access"):
            return f"q at {self.endpoint} rejected the credentials of {self.settings.user_text()}"
        if "connection error" in low:
            tls = " (TLS handshake or certificate failure?)" if self.settings.tls else ""
            return f"cannot connect to q at {self.endpoint}: connection refused or unreachable{tls}"
        return f"cannot connect to q at {self.endpoint}: {type(exc).__name__}: {text}"

    def _failed(self, message: str) -> None:
        self._conn = None
        self._failures += 1
        self._next_attempt = self._clock() + self._delay()
        self.last_error = message

    def _delay(self) -> float:
        s = self.settings
        return float(min(s.reconnect_max, s.reconnect_initial * 2 ** max(0, self._failures - 1)))

    def _drop(self, reason: str, during_query: bool = False) -> None:
        """The connection is lost: close it and schedule the reconnect.

        Lost during a query, or after it had proved itself, the next use may
        reconnect at once (a caller drives that, one attempt per call). Lost
        on its own before it ever worked, it counts as a failed connect, so
        the idle loop cannot spin on a q that accepts and then hangs up.
        """
        now = self._clock()
        proven = during_query or self._proven or now - self._connected_at >= self.settings.reconnect_max
        self.close()
        if proven:
            self._failures = 0
            self._next_attempt = now  # it was healthy: try again at once
        else:
            self._failures += 1  # connect-then-drop, repeatedly, must not spin
            self._next_attempt = now + self._delay()
        self._proven = False
        self.last_error = _scrub(reason, self._secret)

    def _lost_reason(self, conn: Any, exc: BaseException) -> str | None:
        """Why this failure means the connection is gone, or None if it is still usable."""
        ep = self.endpoint
        text = str(exc)
        if type(exc).__name__ == "QError":
            if text == _PYKX_TIMEOUT:
                return f"no reply from q at {ep} within {self.settings.timeout:g}s (q.timeout); the connection was dropped and the query may still run on q"
            dead = any(marker in text for marker in _DEAD_HANDLE)  # else: q's own error reply
        else:
            # pykx reports a broken socket as RuntimeError (its send/recv wrappers) or OSError;
            # an interrupt mid-message leaves the stream unusable too
            dead = getattr(conn, "closed", False) or isinstance(exc, (RuntimeError, OSError)) or not isinstance(exc, Exception)
        if not dead:
            return None
        detail = _scrub(f"{type(exc).__name__}: {text}", self._secret)
        return f"lost the connection to q at {ep} during a query ({detail}); the query was not re-sent and may or may not have run"

    def _fileno(self) -> int:
        try:
            return int(self._conn.fileno())
        except Exception:  # noqa: BLE001 - a fake or half-closed connection: nothing to watch
            return -1

    def _check_idle_socket(self, fd: int) -> None:
        """q's socket became readable while no query was in flight: EOF means q closed it."""
        try:
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            self._drop("the connection was closed")
            return
        try:
            data = probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(f"q at {self.endpoint} reset the connection ({exc.strerror or exc})")
            return
        finally:
            probe.close()
        if not data:
            self._drop(f"q at {self.endpoint} closed the connection")
        else:
            # Unsolicited bytes (an async message from q, TLS records): pykx deals with them
            # at the next call. Stop watching this connection, or select() would spin on them.
            self._watching = False

    @staticmethod
    def _pykx_connect(s: QSettings, password: str) -> Any:
        import pykx

        if s.tls:
            # libe reads these when it makes its first TLS connection in this process, and never
            # again. tls_verify decides, not an environment the worker inherited: a
            # KX_SSL_VERIFY_SERVER=NO left in the daemon's would otherwise turn verification
            # off silently in a pool configured to verify.
            if s.tls_ca_file:
                os.environ["SSL_CA_CERT_FILE"] = s.tls_ca_file
            if s.tls_verify:
                os.environ.pop("KX_SSL_VERIFY_SERVER", None)
            else:
                os.environ["KX_SSL_VERIFY_SERVER"] = "NO"
        kwargs: dict[str, Any] = dict(
            username=s.username,
            password=password,
            timeout=s.timeout,  # > 0 always: with 0, pykx busy-polls while it waits for a reply
            tls=s.tls,
            unix=s.unix,
            no_ctx=True,  # see the module docstring
            reconnection_attempts=-1,  # never let pykx re-send a query (at-most-once)
        )
        if "connection_timeout" in _params(pykx.SyncQConnection.__init__):
            kwargs["connection_timeout"] = s.connect_timeout
        return pykx.SyncQConnection(s.host, s.port, **kwargs)


def _params(fn: Callable[..., object]) -> frozenset[str]:
    """``fn``'s parameter names; none if it has no signature Python can read (e.g. a C function)."""
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return frozenset()


def open_handle(spec: Mapping[str, Any]) -> QHandle:
    """The worker's ``q``: created and connected once (a failure is remembered, not raised)."""
    handle = QHandle(spec)
    handle.try_connect()
    return handle


def error_payload(exc: QConnectionError) -> bytes:
    """REPLY payload for status Q_UNAVAILABLE: the daemon's refusal shape, ``{"message": ...}``."""
    return json.dumps({"message": str(exc), "type": "QConnectionError"}).encode()
