"""The kdb+ IPC front door: q processes and pykx clients call the pool without blocking.

Listeners: ``qipc.listen`` (TCP, optionally TLS) and the abstract Unix socket
``@/tmp/kx.<port>`` that q's ``hopen`:unix://<port>`` and pykx's
``unix=True`` dial. One ``QConnection`` (an asyncio BufferedProtocol) per
handle.

Data flow of one message::

    handshake (user:password + capability + NUL; qauth decides; one byte back)
    -> 8-byte header -> body read straight into a buffer that keeps RESERVE
       free bytes in front of the message
    -> the handle's inbox (at most qipc.max_pending messages and
       daemon.max_message_bytes bytes: reading pauses beyond that)
    -> the handle's task takes messages in order:
         compressed?       pykx.deserialize + serialize: the plain message
         peek (qwire)      string or general list, head name, item count
         route             endpoint | pykx.remote (qremote) | .cruised.* | refusal
         QCALL frame       built in place in the same buffer: frame header and
                           head JSON in the reserve, the argument bytes untouched
         Job               submitted to the endpoint's pool's Dispatcher, exactly
                           as the other doors do (door="qipc")
    <- the worker's REPLY carries the complete q message (pool/qcall.py); it is
       written to the handle unchanged. Daemon refusals (busy, timeouts, crash,
       shutdown) become q error lines here.

This process never converts q data to Python: argument bytes are opaque, as
pickles are for the native door. pykx is imported here only to decompress
the rare compressed request, to read the last two items of an async
message that may be KX's deferred-sync form, and to serialize the door's own
small answers (``::``, ``1b``, the ``.cruised.*`` tables, callback errors).

Ordering on one handle (what q developers rely on)
    Messages are taken strictly in the order they arrived. A sync or plain
    async message waits for everything before it to finish, then runs to
    completion before the next one starts: sync replies come back in request
    order, async messages run in the order sent, and ``h""`` after a burst of
    ``neg[h]`` sends returns only once they all ran. The one exception is the
    deferred-sync form ``neg[h](`ep; args...; `callback; reqid)``: those are
    submitted in order but run concurrently (up to
    ``qipc.callback_concurrency``), because their point is to let a ``-30!``
    gateway serve many clients over one handle; each answer carries the
    caller's reqid, and the next sync or plain message still waits for all of
    them. Many handles always run concurrently. The price of the order is
    that one slow call holds up the later messages of its own handle (never
    another handle's): a q process that wants several of its calls to run at
    once opens several handles, or uses the callback form.

A handle that goes away drops its queued jobs (``Dispatcher.drop_client``);
a running one is interrupted (the pool's ``on_disconnect: cancel``) or
finishes with its answer discarded (``finish``).

The door sees the daemon only through ``DoorHost`` (daemon/doors/host.py):
the serving config and dispatchers, ``pool_status()`` for ``.cruised.stats``,
and ``auth_failed`` for refused logins.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import re
import socket
import ssl
from typing import TYPE_CHECKING, Any, cast

from cruised.core import services
from cruised.core.dispatch import FutureReply, Job
from cruised.doors import access
from cruised.doors.qipc import remote as qremote
from cruised.doors.qipc import wire as qwire
from cruised.doors.qipc.auth import PASSWORD, Authenticator, UsersFileError, is_loopback, peer_may_run_code
from cruised.doors.qipc.wire import MSG_ASYNC, MSG_RESPONSE, MSG_SYNC, Header, WireError
from cruised.doors.sockets import SocketInUse, bind_tcp, next_job_id, peer_caller, peer_credentials
from cruised.pool import nesting, qcall
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.config import Config
    from cruised.core.dispatch import Dispatcher
    from cruised.doors.host import DoorHost

log = logging.getLogger("cruised.qipc")

#: free bytes kept in front of each received message: the QCALL frame header and its
#: head JSON are written there, so the arguments reach the worker without a copy
#: (<= frames.ENVELOPE_SLACK, which a worker's read limit allows for)
RESERVE = 1000
#: tracebacks kept for h(`.cruised.trace; id)
TRACES_KEPT = 256
_SCRATCH = bytearray(1 << 16)
UNSUPPORTED = "cruised: q expressions not supported; use h(`endpoint;args)"
_SIGNAL = re.compile(r"signal (SIG\w+|\d+)")
_EXIT = re.compile(r"exit code (-?\d+)")


def import_pykx() -> Any:
    """pykx for this process, unlicensed, without leaking its import-time variables to the workers.

    pykx sets QHOME, PYKX_* and QPATH in ``os.environ`` when imported; pykx's
    docs warn that children inheriting them can crash, and the pools' templates
    are started with this process's environment. So the environment is put
    back exactly as it was.
    """
    saved = dict(os.environ)
    os.environ["PYKX_UNLICENSED"] = "true"  # the supervisor never needs a licence, nor a licensed q
    os.environ.pop("PYKX_LICENSED", None)
    os.environ.setdefault("PYKX_SUPPRESS_WARNINGS", "true")
    try:
        import pykx
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return pykx


QReply = FutureReply  # the ReplySink of one call: the dispatcher's answer resolves a future


class QipcDoor:
    def __init__(self, host: DoorHost) -> None:
        self.host = host
        self.loop = host.loop
        #: the listening settings (listen, unix, TLS) as started: a reload does not re-bind them
        self.cfg = host.config.qipc
        self.auth = Authenticator(self.cfg)
        self._auth_config: Config = host.config
        self.kx: Any = None
        self.servers: list[asyncio.base_events.Server] = []
        self.connections: set[QConnection] = set()
        self.listen_host = ""  # the bound TCP address (``host`` is the daemon)
        self.port = 0
        self.unix_name: str | None = None
        self.logins = {"ok": 0, "failed": 0}
        #: calls answered by the door itself, by reason (they never reached a pool)
        self.refused: collections.Counter[str] = collections.Counter()
        #: request id -> (user, traceback): h(`.cruised.trace; id) shows it to that user only
        self.traces: collections.OrderedDict[int, tuple[str, str]] = collections.OrderedDict()
        self._sweeper: asyncio.TimerHandle | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Import pykx, bind TCP (and the Unix socket); SocketInUse if an address is taken."""
        self.kx = import_pykx()
        address = self.cfg.address()
        assert address is not None
        host, port = address
        tcp = self._bind_tcp(host, port)
        self.listen_host, self.port = tcp.getsockname()[:2]
        tls = None
        if self.cfg.tls_cert and self.cfg.tls_key:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(self.cfg.tls_cert, self.cfg.tls_key)
        try:
            self.servers.append(await self.loop.create_server(lambda: QConnection(self, unix=False), sock=tcp, ssl=tls, backlog=512))
            if self.cfg.unix:
                name = f"/tmp/kx.{self.port}"
                us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    us.bind("\0" + name)  # abstract: nothing on disk, gone with the process
                except OSError as exc:
                    us.close()
                    raise SocketInUse(f"cannot listen on the abstract Unix socket @{name} (qipc.unix): {exc.strerror or exc}") from None
                self.unix_name = "@" + name
                self.servers.append(await self.loop.create_unix_server(lambda: QConnection(self, unix=True), sock=us, backlog=512))
        except BaseException:
            self.stop_listening()
            raise
        self._sweeper = self.loop.call_later(1.0, self._sweep)
        log.info("qipc listening on %s:%s%s%s", self.listen_host, self.port, " (TLS)" if tls else "", f" and {self.unix_name}" if self.unix_name else "")
        log.info("%s", access.qipc_line(self.host.config, f"{self.listen_host}:{self.port}"))

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        sock = bind_tcp(host, port, "qipc.listen")
        sock.setblocking(False)
        return sock

    def stop_listening(self) -> None:
        """Accept no new handles; the open ones keep being served until close()."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def close(self, grace: float = 1.0) -> None:
        """After every job is answered: close the handles once their replies are written."""
        self.stop_listening()
        for conn in list(self.connections):
            conn.close()
        end = self.loop.time() + grace
        while self.connections and self.loop.time() < end:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()

    def _sweep(self) -> None:
        """Close handles whose handshake or current message stalled past daemon.read_timeout."""
        limit = self.host.config.daemon.read_timeout
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.partial_since is not None and now - conn.partial_since > limit:
                log.warning(
                    "qipc: closing %s: %s incomplete for over %gs (daemon.read_timeout)", conn.who(), "handshake" if conn.user is None else "message", limit
                )
                conn.abort()
        self._sweeper = self.loop.call_later(min(1.0, limit / 2), self._sweep)

    # -- shared services for the connections ------------------------------------------

    def authenticator(self) -> Authenticator:
        cfg = self.host.config
        if cfg is not self._auth_config:  # a reload: the users file, loopback trust or endpoint lists may have changed
            try:
                self.auth = Authenticator(cfg.qipc)
            except UsersFileError as exc:  # validated at reload; unreadable since: keep the previous rules
                log.error("qipc.users_file: %s; keeping the previous login rules", exc)
            self._auth_config = cfg
        return self.auth

    def remember_trace(self, request_id: int, user: str, tb: str) -> None:
        self.traces[request_id] = (user, tb)
        while len(self.traces) > TRACES_KEPT:
            self.traces.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        return {
            "listen": f"{self.listen_host}:{self.port}" if self.port else None,
            "port": self.port,
            "unix": self.unix_name,
            "tls": bool(self.cfg.tls_cert),
            "connections": len(self.connections),
            "logins": dict(self.logins),
            "refused": dict(self.refused),
            "auth": access.qipc_auth(self.host.config),
        }

    # -- the door's own answers (small; pykx serializes them) ----------------------------

    def serialize(self, obj: Any, cap: int, msgtype: int = MSG_RESPONSE) -> bytes:
        kx = self.kx
        return bytes(kx.serialize(obj if isinstance(obj, kx.K) else kx.toq(obj), mode=cap, wait=msgtype).copy())

    def callback_error(self, callback: Any, caller_id: Any, text: str, cap: int) -> bytes:
        kx = self.kx
        payload = kx.toq([kx.toq(True), kx.toq(text, strings_as_char=True)])
        return self.serialize(kx.toq([callback, caller_id, payload]), cap, MSG_ASYNC)

    def stats_table(self) -> Any:
        import pandas as pd

        rows = []
        for name, st in self.host.pool_status().items():
            w, q, r = st["workers"], st["queue"], st["requests"]
            rows.append(
                {
                    "pool": name,
                    "ready": bool(st["ready"]),
                    "idle": w.get("idle", 0),
                    "busy": w.get("busy", 0),
                    "starting": w.get("starting", 0),
                    "queued": q["depth"],
                    "capacity": q["capacity"],
                    "oldest_s": float(q["oldest_s"]),
                    "ok": r.get("ok", 0),
                    "errors": r.get("error", 0) + r.get("bad_request", 0) + r.get("unavailable", 0),
                    "rejected": r.get("rejected", 0),
                    "queue_timeouts": r.get("queue_timeout", 0),
                    "exec_timeouts": r.get("exec_timeout", 0),
                    "crashed": r.get("crashed", 0),
                }
            )
        df = pd.DataFrame(rows)
        df["pool"] = df["pool"].astype(object)
        return self.kx.toq(df)

    def endpoints_table(self) -> Any:
        import pandas as pd

        cfg = self.host.config
        rows = []
        for name, (_, _, ep) in cfg.endpoints().items():
            disp = self.host.dispatcher(ep.pool)
            state = services.endpoint_state(disp, name) if disp is not None else services.EndpointState("pool_unavailable", "no such pool")
            arity = (disp.ready_info.get("q_arity") or {}).get(name, {}) if disp is not None else {}
            rows.append(
                {
                    "endpoint": name,
                    "pool": ep.pool,
                    "state": state.state,
                    # free text as strings (bytes become char vectors), names as symbols
                    "signature": str(arity.get("signature", "")).encode(),
                    "error": (state.error or "").encode(),
                    "description": ep.description.encode(),
                }
            )
        columns = ["endpoint", "pool", "state", "signature", "error", "description"]
        return self.kx.toq(pd.DataFrame(rows, columns=columns, dtype=object))


#: compressed messages that decompress to more bytes than this are decompressed in a thread (~4 MB/s)
DECOMPRESS_INLINE = 64 << 10


class QConnection(asyncio.BufferedProtocol):
    """One q handle: handshake, reading, its ordered inbox, its replies. The ReplySink owner of its jobs."""

    def __init__(self, door: QipcDoor, unix: bool) -> None:
        self.door = door
        self.host = door.host
        self.loop = door.loop
        self.unix = unix
        self.transport: asyncio.Transport | None = None
        self.peer: Any = None
        self.user: str | None = None  # set once logged in
        #: who its calls are for (daemon/core/fairness.py): the q user, else the peer's user (Unix socket) or address
        self.caller = ""
        #: how it logged in (auth.PASSWORD, LOOPBACK or LOCAL): decides whether it may run code
        self.login: str | None = None
        self.cap = 0
        self.closed = False
        self.partial_since: float | None = self.loop.time()
        self._hs = bytearray(qwire.HANDSHAKE_MAX)
        self._hs_len = 0
        self._hdr = bytearray(qwire.HEADER_SIZE)
        self._hdr_got = 0
        self._header: Header | None = None
        self._msg: bytearray | None = None
        self._msg_got = 0
        self._inbox: collections.deque[tuple[Header, bytearray]] = collections.deque()
        self._inbox_bytes = 0
        self._wake = asyncio.Event()
        self._reading_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._task: asyncio.Task[None] | None = None
        self._callbacks: set[asyncio.Task[None]] = set()
        #: pykx.remote libraries this session added: alias -> module
        self.libraries: dict[str, str] = {}

    def who(self) -> str:
        """``user@peer`` for the log; a client-chosen user name is shown escaped and cut short."""
        where = "unix" if self.unix else (f"{self.peer[0]}:{self.peer[1]}" if isinstance(self.peer, tuple) else str(self.peer))
        user = self.user or "-"
        if not user.isprintable() or len(user) > 40:
            user = ascii(user[:40])
        return f"{user}@{where}"

    # -- asyncio protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.peer = transport.get_extra_info("peername")
        limit = self.host.config.daemon.max_connections
        if len(self.door.connections) >= limit:
            log.warning("qipc: refused a connection from %s: too many connections (%d, daemon.max_connections)", self.who(), limit)
            self.closed = True
            transport.abort()
            return
        self.door.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.closed or (self.transport is not None and self.transport.is_closing()):
            return memoryview(_SCRATCH)  # closing: whatever still arrives is dropped
        if self.user is None:
            # one byte at a time: the handshake ends at its NUL and nothing after it is read early
            return memoryview(self._hs)[self._hs_len : self._hs_len + 1]
        if self._msg is None:
            return memoryview(self._hdr)[self._hdr_got :]
        assert self._header is not None
        return memoryview(self._msg)[RESERVE + self._msg_got : RESERVE + self._header.total]

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed or (self.transport is not None and self.transport.is_closing()):
            return
        if self.user is None:
            self._handshake_byte(nbytes)
        elif self._msg is None:
            self._hdr_got += nbytes
            if self.partial_since is None:
                self.partial_since = self.loop.time()
            if self._hdr_got == qwire.HEADER_SIZE:
                self._start_message()
        else:
            self._msg_got += nbytes
            assert self._header is not None
            if self._msg_got == self._header.total:
                self._inbox.append((self._header, self._msg))
                self._inbox_bytes += self._header.total
                self._header, self._msg, self._msg_got, self._hdr_got = None, None, 0, 0
                self.partial_since = None
                self._wake.set()
                if self._inbox_full() and not self._reading_paused:
                    self._reading_paused = True
                    assert self.transport is not None
                    self.transport.pause_reading()

    def _inbox_full(self, fraction: float = 1.0) -> bool:
        """Messages read ahead: at most qipc.max_pending, and at most daemon.max_message_bytes of them."""
        return len(self._inbox) >= self.host.config.qipc.max_pending * fraction or self._inbox_bytes >= self.host.config.daemon.max_message_bytes * fraction

    def eof_received(self) -> bool | None:
        return False  # close; replies still queued are flushed by the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.door.connections.discard(self)
        if self._task is not None:
            self._task.cancel()
        for task in list(self._callbacks):
            task.cancel()
        self._inbox.clear()
        self._inbox_bytes = 0
        for disp in self.host.all_dispatchers():
            disp.drop_client(self)
        if self.user is not None:
            log.debug("qipc: %s closed", self.who())

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- handshake ----------------------------------------------------------------------

    def _handshake_byte(self, nbytes: int) -> None:
        self._hs_len += nbytes
        if self._hs[self._hs_len - 1] != 0:
            if self._hs_len >= qwire.HANDSHAKE_MAX:
                log.warning("qipc: closing %s: handshake longer than %d bytes", self.who(), qwire.HANDSHAKE_MAX)
                self.abort()
            return
        hs = qwire.parse_handshake(bytes(self._hs[: self._hs_len - 1]))
        local = self.unix or is_loopback(self.peer)
        how = self.door.authenticator().login(hs.user, hs.password, local)
        if how is None:
            self.door.logins["failed"] += 1
            self.door.host.auth_failed("qipc")
            log.warning("qipc: login refused for user %s from %s", ascii(hs.user[:40]), "unix" if self.unix else self.peer)
            self.abort()  # no byte back: q's 'access, pykx's "Authentication error"
            return
        self.door.logins["ok"] += 1
        self.user = hs.user
        self.login = how
        self.caller = self._caller_name()
        self.cap = hs.agreed
        self._hs = bytearray()
        self.partial_since = None
        assert self.transport is not None
        self.transport.write(bytes([self.cap]))
        log.debug("qipc: %s logged in (capability %s)", self.who(), hs.capability)
        self._task = self.loop.create_task(self._serve())

    def _caller_name(self) -> str:
        if self.user:
            return self.user
        if self.unix and self.transport is not None:
            return peer_caller(self.transport.get_extra_info("socket"))
        return f"q:{self.peer[0]}" if isinstance(self.peer, tuple) and self.peer else "q:unknown"

    # -- reading messages -----------------------------------------------------------------

    def _start_message(self) -> None:
        try:
            header = qwire.parse_header(self._hdr)
        except WireError as exc:
            log.warning("qipc: closing %s: %s", self.who(), exc)
            self.abort()
            return
        limit = self.host.config.daemon.max_message_bytes
        if header.total > limit:
            log.warning("qipc: closing %s: a message of %d bytes exceeds daemon.max_message_bytes (%d)", self.who(), header.total, limit)
            if header.msgtype == MSG_SYNC:
                self.write(qcall.error_frame(f"cruised: message of {header.total} bytes exceeds the limit of {limit} bytes"))
            self.close()
            return
        self._header = header
        self._msg = bytearray(RESERVE + header.total)
        self._msg[RESERVE : RESERVE + qwire.HEADER_SIZE] = self._hdr
        self._msg_got = qwire.HEADER_SIZE

    async def _next(self) -> tuple[Header, bytearray]:
        while not self._inbox:
            self._wake.clear()
            await self._wake.wait()
        item = self._inbox.popleft()
        self._inbox_bytes -= item[0].total
        if self._reading_paused and not self._inbox_full(0.5) and not self.closed:
            self._reading_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        return item

    async def _serve(self) -> None:
        while not self.closed:
            header, buf = await self._next()
            await self._writable.wait()  # a client that does not read its replies stops being served
            try:
                await self._message(header, buf)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("qipc: internal error on a message from %s", self.who())
                if header.msgtype == MSG_SYNC:
                    self.write(qcall.error_frame("cruised: internal error (see the daemon log)"))

    # -- writing -------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        """Close once the queued replies are written."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def answer(self, header: Header, reply: bytes) -> None:
        """The door's own answer to a message: sent for sync, dropped for async."""
        if header.msgtype == MSG_SYNC:
            self.write(reply)

    def refuse(self, header: Header, text: str, reason: str) -> None:
        self.door.refused[reason] += 1
        if header.msgtype == MSG_SYNC:
            self.write(qcall.error_frame(text))
        else:
            log.info("qipc: async message from %s refused: %s", self.who(), text)

    async def _barrier(self) -> None:
        """Everything this handle sent before must have finished (deferred-sync calls included)."""
        while self._callbacks:
            await asyncio.wait(list(self._callbacks))

    # -- routing ---------------------------------------------------------------------------

    async def _message(self, header: Header, buf: bytearray) -> None:
        if header.msgtype == MSG_RESPONSE:
            log.info("qipc: ignored an unsolicited response message from %s", self.who())
            return
        if header.compressed:
            try:
                header, buf = await self._decompress(header, buf)
            except WireError as exc:
                await self._barrier()
                self.refuse(header, f"cruised: bad compressed message: {exc}", "malformed")
                return
        try:
            p = qwire.peek(memoryview(buf)[RESERVE : RESERVE + header.total], header.little)
        except WireError as exc:
            await self._barrier()
            self.refuse(header, f"cruised: malformed message: {exc}", "malformed")
            return
        if p.text is not None:
            await self._barrier()
            self._text(header, p.text)
            return
        if p.head is None:
            await self._barrier()
            self.refuse(header, UNSUPPORTED, "expression")
            return
        kind = qremote.classify_lambda(p.head)
        if kind is not None:
            await self._barrier()
            await self._remote(header, buf, p, kind)
            return
        if p.head.startswith("{"):
            await self._barrier()
            self.refuse(header, UNSUPPORTED, "expression")
            return
        if p.head.startswith(".cruised."):
            await self._barrier()
            self._introspect(header, buf, p)
            return
        await self._endpoint(header, buf, p)

    async def _decompress(self, header: Header, buf: bytearray) -> tuple[Header, bytearray]:
        """The plain message in a fresh buffer with the reserve (qwire.decompress: no deserializing).

        Decompressing runs at about 4 MB/s in Python: above DECOMPRESS_INLINE bytes it runs in
        a thread, so the loop keeps serving other requests meanwhile (sharing the GIL).
        """
        msg = memoryview(buf)[RESERVE : RESERVE + header.total]
        size = qwire.uncompressed_size(msg, header.little)
        limit = self.host.config.daemon.max_message_bytes
        if size > limit:
            raise WireError(f"it would decompress to {size} bytes, above daemon.max_message_bytes ({limit})")
        if size <= DECOMPRESS_INLINE:
            plain = qwire.decompress(msg, header.little)
        else:
            plain = await asyncio.to_thread(qwire.decompress, bytes(msg), header.little)
        out = bytearray(RESERVE) + plain
        return Header(header.little, header.msgtype, False, size), out

    def _text(self, header: Header, text: str) -> None:
        kind = qremote.classify_text(text)
        if kind == "probe":
            self.answer(header, self.door.serialize(True, self.cap))
        elif kind == "load" or not text.strip():
            # load pykx.q: it is "loaded" already; h"" (q's chaser after async sends): ::
            self.answer(header, self.door.serialize(None, self.cap))
        else:
            self.refuse(header, UNSUPPORTED, "expression")

    def _introspect(self, header: Header, buf: bytearray, p: qwire.Peek) -> None:
        name = p.head
        door = self.door
        if name == ".cruised.stats":
            self.answer(header, door.serialize(door.stats_table(), self.cap))
        elif name == ".cruised.endpoints":
            self.answer(header, door.serialize(door.endpoints_table(), self.cap))
        elif name == ".cruised.trace":
            items = self._items(header, buf)
            try:
                rid = int(items[1].py()) if len(items) == 2 else None
            except (TypeError, ValueError, AttributeError):
                rid = None
            kept = door.traces.get(rid) if rid is not None else None
            tb = kept[1] if kept is not None and kept[0] == (self.user or "") else None
            if tb is None:
                self.refuse(header, f"cruised: no traceback kept for request {rid}", "unknown")
            else:
                self.answer(header, door.serialize(door.kx.toq(tb, strings_as_char=True), self.cap))
        else:
            self.refuse(header, f"cruised: unknown endpoint {name} (built in: .cruised.stats, .cruised.endpoints, .cruised.trace)", "unknown")

    def _items(self, header: Header, buf: bytearray) -> list[Any]:
        """The whole message as pykx objects (only for the door's own small decisions)."""
        if nesting.q_depth_exceeds(buf, RESERVE, nesting.PEEK_MAX_DEPTH):  # pykx's deserializer overflows the stack near 10^5 levels
            raise WireError(f"nested deeper than {nesting.PEEK_MAX_DEPTH} levels")
        return list(self.door.kx.deserialize(memoryview(buf)[RESERVE : RESERVE + header.total]))

    # -- endpoints ----------------------------------------------------------------------------

    async def _endpoint(self, header: Header, buf: bytearray, p: qwire.Peek) -> None:
        name = p.head
        assert name is not None
        mode = "sync" if header.msgtype == MSG_SYNC else "async"
        callback: tuple[Any, Any] | None = None
        known = self.host.config.endpoints()
        spec = known.get(name)
        disp = self.host.dispatcher(spec[2].pool) if spec is not None else None
        arity = (disp.ready_info.get("q_arity") or {}).get(name) if disp is not None else None
        if mode == "async" and qcall.callback_possible(p.nargs, arity):
            # only now are the items read (in this process, without converting them): is the
            # second last a symbol, and what are the callback's name and the caller's id?
            try:
                items = self._items(header, buf)
            except Exception:  # noqa: BLE001 - its framing was fine; leave the contents to the worker
                items = []
            if len(items) == p.nargs + 1 and qcall.wants_callback(p.nargs, isinstance(items[-2], self.door.kx.SymbolAtom), arity):
                mode, callback = "callback", (items[-2], items[-1])
            del items
        if mode != "callback":
            await self._barrier()
        problem: tuple[str, str] | None = None
        if spec is None or disp is None:
            problem = (f"cruised: unknown endpoint {name}", "unknown")
        elif not self.door.authenticator().may_call(self.user or "", name):
            problem = (f"access: {name}", "access")
        if problem is not None:
            if callback is not None:
                self.door.refused[problem[1]] += 1
                self.write(self.door.callback_error(callback[0], callback[1], problem[0], self.cap))
            else:
                self.refuse(header, *problem)
            return
        assert disp is not None
        prefix = bytes([qwire.T_LIST, 0]) + p.nargs.to_bytes(4, "little" if header.little else "big", signed=True)
        head = {"target": "endpoint", "name": name, "cap": self.cap, "mode": mode}
        frame = build_qcall(buf, RESERVE + p.args_at, RESERVE + header.total, prefix, head, header.little)
        job = Job(
            id=next_job_id(), kind=Kind.QCALL, frame=frame, sink=QReply(self.loop), client=self, client_reqid=0, endpoint=name, door="qipc", caller=self.caller
        )
        if mode == "callback":
            while len(self._callbacks) >= self.host.config.qipc.callback_concurrency:
                await asyncio.wait(list(self._callbacks), return_when=asyncio.FIRST_COMPLETED)
            disp.submit(job)
            task = self.loop.create_task(self._complete_callback(job, disp, header, callback))
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)
            return
        disp.submit(job)
        await self._complete(job, disp, header, mode, None)

    async def _complete_callback(self, job: Job, disp: Dispatcher, header: Header, callback: tuple[Any, Any] | None) -> None:
        try:
            await self._complete(job, disp, header, "callback", callback)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("qipc: internal error answering request #%d from %s", job.id, self.who())

    async def _complete(self, job: Job, disp: Dispatcher, header: Header, mode: str, callback: tuple[Any, Any] | None) -> None:
        """Wait for the job's answer and pass it on (or turn the daemon's refusal into a q error)."""
        assert isinstance(job.sink, QReply)
        status, reply, message = await job.sink.future
        if reply is not None:
            self._forward(job, reply)
            return
        text = self._refusal_text(job, disp, status, message)
        log.info("qipc: %s %s request #%d: %s", self.who(), job.endpoint, job.id, text)
        if mode == "sync":
            self.write(qcall.error_frame(text))
        elif mode == "callback" and callback is not None:
            self.write(self.door.callback_error(callback[0], callback[1], text, self.cap))

    def _forward(self, job: Job, reply: bytearray) -> None:
        """Write the q message the worker built (a response, an error, a callback, or nothing)."""
        off = frames.HEADER_SIZE
        (n,) = qcall.INFO_LEN.unpack_from(reply, off)
        info = json.loads(bytes(reply[off + 4 : off + 4 + n]) or b"{}")
        data = memoryview(reply)[off + 4 + n :]
        if info.get("traceback"):
            self.door.remember_trace(job.id, self.user or "", info["traceback"])
        if info.get("error"):
            # the traceback is kept for h(`.cruised.trace; id) and stays out of the one-line log
            log.info("qipc: %s %s request #%d failed: %s", self.who(), job.endpoint, job.id, info["error"])
        if data.nbytes:
            self.write(data)

    def _refusal_text(self, job: Job, disp: Dispatcher, status: int, message: str) -> str:
        rid = job.id
        if status == Status.QUEUE_FULL:
            return qcall.error_line(f"cruised: busy (queue {len(disp.queue)}/{disp.config.queue_size})", rid)
        if status == Status.QUEUE_TIMEOUT:
            return qcall.error_line(f"cruised: queue timeout after {disp.config.queue_timeout:g}s", rid)
        if status == Status.EXEC_TIMEOUT:
            limit = job.exec_limit or disp.config.exec_timeout
            return qcall.error_line(f"cruised: timeout after {limit:g}s", rid)
        if status == Status.WORKER_CRASHED:
            m = _SIGNAL.search(message)
            how = m.group(1) if m else (f"exit {m2.group(1)}" if (m2 := _EXIT.search(message)) else "unknown cause")
            return qcall.error_line(f"cruised: worker died ({how})", rid)
        if status == Status.SHUTTING_DOWN:
            return qcall.error_line("cruised: shutting down", rid)
        if status == Status.DRAINING:
            return qcall.error_line("cruised: draining (cruised drain); call another daemon or retry after cruised ready", rid)
        if status == Status.UNKNOWN_FUNCTION:
            return qcall.error_line("cruised: the function was lost by the daemon; call it again", rid)
        return qcall.error_line(f"cruised: {message}", rid)

    # -- pykx.remote ---------------------------------------------------------------------------

    def code_refusal(self) -> str | None:
        """Why this handle may not run pykx.remote code (a q error line naming the setting), or None.

        Code is arbitrary Python in a worker, as the workers' user and with their q
        connections: it needs ``qipc.remote_functions`` and a login that proves who
        sent it (a password from users_file, or an allowed peer uid on the Unix socket).
        """
        cfg = self.host.config
        if not cfg.qipc.remote_functions:
            return "cruised: pykx.remote functions are off on this door (qipc.remote_functions: false); endpoint calls work"
        if self.login == PASSWORD:
            return None
        if self.unix:
            sock = self.transport.get_extra_info("socket") if self.transport is not None else None
            try:
                _, uid, gid = peer_credentials(sock) if sock is not None else (-1, -1, -1)
            except OSError:
                uid = gid = -1
            if peer_may_run_code(uid, gid, cfg.daemon.allow_uids, cfg.daemon.allow_gids, os.getuid()):
                return None
            return (
                f"cruised: pykx.remote needs a password login from qipc.users_file, or a peer uid in daemon.allow_uids "
                f"(uid {uid} is not); loopback trust covers endpoint calls only"
            )
        return (
            "cruised: pykx.remote needs a password login from qipc.users_file; loopback trust (qipc.allow_loopback_without_password) covers endpoint calls only"
        )

    async def _remote(self, header: Header, buf: bytearray, p: qwire.Peek, kind: str) -> None:
        refusal = self.code_refusal()
        if refusal is not None:
            log.warning("qipc: %s pykx.remote %s refused: %s", self.who(), kind, refusal)
            self.refuse(header, refusal, "remote_functions")
            return
        pool = self.host.config.qipc.remote_pool
        disp = self.host.dispatcher(pool)
        if disp is None:
            self.refuse(header, f"cruised: no pool {pool!r} for pykx.remote (qipc.remote_pool)", "unknown")
            return
        try:
            parsed = _parse_remote(memoryview(buf)[RESERVE : RESERVE + header.total], header, p.args_at, kind)
        except WireError as exc:
            self.refuse(header, f"cruised: malformed pykx.remote message: {exc}", "malformed")
            return
        if kind in ("library", "library2"):
            alias, module = parsed
            await self._library(header, disp, kind, alias, module)
            return
        source, name, args_at, end = parsed
        await self._function(header, buf, disp, source, name, RESERVE + args_at, RESERVE + end)

    async def _library(self, header: Header, disp: Dispatcher, kind: str, alias: str, module: str) -> None:
        if self.libraries.get(alias) == module:
            self.answer(header, self.door.serialize(None, self.cap))
            return
        if not alias.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
            self.refuse(header, qremote.library_error(kind, alias, module, "not a Python module name"), "malformed")
            return
        payload = frames.pack_name(disp.name) + json.dumps({"libraries": {alias: module}}).encode()
        job = Job(
            id=next_job_id(),
            kind=Kind.CHECK,
            frame=bytearray(frames.frame(Kind.CHECK, 0, payload)),
            sink=QReply(self.loop),
            client=self,
            client_reqid=0,
            endpoint="check",
            door="qipc",
            caller=self.caller,
        )
        disp.submit(job)
        assert isinstance(job.sink, QReply)
        status, reply, message = await job.sink.future
        if reply is not None and status == Status.OK:
            self.libraries[alias] = module
            self.answer(header, self.door.serialize(None, self.cap))
            return
        if reply is not None and status == Status.ERROR:
            info, _ = frames.parse_error(reply)
            message = json.loads(info).get("message", "")
        else:
            message = self._refusal_text(job, disp, status, message)
        self.refuse(header, qremote.library_error(kind, alias, module, message), "library")

    async def _function(self, header: Header, buf: bytearray, disp: Dispatcher, source: bytes, name: str, start: int, end: int) -> None:
        libraries = dict(self.libraries)
        key = qremote.function_key(source, name, libraries)
        head = {"target": "function", "name": name, "key": key.hex(), "cap": self.cap, "mode": "sync" if header.msgtype == MSG_SYNC else "async"}
        frame = build_qcall(buf, start, end, b"", head, header.little)
        for attempt in (1, 2):
            if key not in disp.code:  # compiled once per worker: the source travels only with the first call
                disp.register(key, qremote.define_frame(disp.name, key, name, source, libraries))
            job = Job(
                id=next_job_id(),
                kind=Kind.QCALL,
                frame=frame,
                sink=QReply(self.loop),
                client=self,
                client_reqid=0,
                key=key,
                endpoint="function",
                door="qipc",
                caller=self.caller,
            )
            disp.submit(job)
            assert isinstance(job.sink, QReply)
            status, reply, message = await job.sink.future
            if status == Status.UNKNOWN_FUNCTION and attempt == 1:
                continue  # evicted between register and start: define it again, once
            if reply is not None and status != Status.UNKNOWN_FUNCTION:
                self._forward(job, reply)
                return
            text = self._refusal_text(job, disp, status, message)
            log.info("qipc: %s pykx.remote %s request #%d: %s", self.who(), name, job.id, text)
            if header.msgtype == MSG_SYNC:
                self.write(qcall.error_frame(text))
            return


def _parse_remote(msg: memoryview, header: Header, args_at: int, kind: str) -> tuple[Any, ...]:
    """(alias, module) of a library message; (source, name, args offset, args end) of a call.

    A function of its own so the views on the receive buffer are gone when it
    returns (the buffer is resized when the frame is cut from it).
    """
    r = qwire.Reader(msg, header.little, args_at)
    if kind == "library":
        return r.symbol(), r.symbol()
    if kind == "library2":
        module = r.symbol()
        return module.split(".")[0], module
    source = r.char_vector_bytes()
    name = r.symbol()
    end = header.total
    if kind == "call":
        r.long_atom_at_end()
        end -= qwire.LONG_ATOM_SIZE
    return source, name, r.pos, end


def build_qcall(buf: bytearray, start: int, end: int, prefix: bytes, head: dict[str, Any], little: bool) -> bytearray:
    """The QCALL frame for the q object ``prefix + buf[start:end]``, built in ``buf`` when it fits.

    Layout: frame header | u16 n | head JSON padded to n bytes | IPC header |
    prefix | the argument bytes. The argument bytes stay where the socket
    put them: the IPC header and prefix overwrite the (already read) bytes
    before them, the frame header and head JSON the reserve.
    """
    qlen = qwire.HEADER_SIZE + len(prefix) + (end - start)
    qstart = start - len(prefix) - qwire.HEADER_SIZE
    head_json = json.dumps(head).encode()
    room = qstart - frames.HEADER_SIZE - qcall.HEAD_LEN.size
    if room >= len(head_json) and room < 1 << 16:
        buf[qstart:start] = qwire.ipc_header(little, MSG_SYNC, qlen) + prefix
        head_at = frames.HEADER_SIZE + qcall.HEAD_LEN.size
        buf[head_at : head_at + room] = head_json.ljust(room)
        qcall.HEAD_LEN.pack_into(buf, frames.HEADER_SIZE, room)
        del buf[end:]
        frames.seal(buf, Kind.QCALL)
        return buf
    # a head too long for the reserve (an odd name): copy once
    out = bytearray(frames.HEADER_SIZE)
    out += qcall.HEAD_LEN.pack(len(head_json)) + head_json
    out += qwire.ipc_header(little, MSG_SYNC, qlen) + prefix
    out += memoryview(buf)[start:end]
    frames.seal(out, Kind.QCALL)
    return out
