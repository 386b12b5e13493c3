"""The remote native door: the native protocol over TCP, mutual TLS only.

For ``cruised.session(host=..., port=..., tls=cruised.TLS(...))`` on other
hosts (and HAProxy in TCP passthrough in front of several daemons). The frames
are the native door's, served by the same ``ClientConnection`` code
(daemon/doors/native.py), minus what cannot cross hosts: no shared files
(PASS_FDS is refused, so a client sends large arguments inline) and no
operator frames (RELOAD and DRAIN are for the local Unix socket).

Admission, in order, for every accepted TCP connection::

    TLS 1.3 handshake (daemon/doors/mtls.py: a client certificate signed by
    remote.client_ca_file, unexpired, not in crl_file; else OpenSSL refuses it
    inside the handshake: no certificate, another CA, expired, revoked, TLS 1.2,
    or bytes that are not a ClientHello)
      -> its CN or a SAN in remote.allowed_clients (else an ACCESS_DENIED
         reply and close)
        -> only now is a ClientConnection made and a single byte of the
           stream handed to the frame reader

Invariant: until the allow-list check has passed there is no ClientConnection
and not one byte is decrypted past the handshake (``TlsStream._read_plain``
runs only for an admitted stream; a refused one is closed with its bytes
still encrypted in its buffer), so no frame of a refused peer can reach a
dispatcher, let alone a worker's unpickler. OpenSSL runs on memory buffers
here, not in asyncio's TLS transport, so that a handshake refusal's alert
reaches the client (which then says "expired", "unknown CA", ...).

Identity: the allowed name the certificate matched is the connection's
``caller`` (where the Unix door has the peer uid) and appears in the access
log as ``peer=tls:<name>@<ip>:<port>``; the full subject is logged at connect.

Reload (SIGHUP, ``cruised reload``): a new context is built from the files
as they are now and serves every connection accepted after it; open
connections keep the one they were made with. If the files cannot be
loaded the reload keeps the previous context and logs why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any, cast

from cruised.config import Config, RemoteConfig
from cruised.doors import access, mtls
from cruised.doors.native import ClientConnection
from cruised.doors.sockets import bind_tcp
from cruised.pool.wire import frames
from cruised.pool.wire.framebuf import FrameBuffer
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.doors.host import DoorHost

log = logging.getLogger("cruised.remote")

RECV_SIZE = 256 << 10
#: plaintext handed to OpenSSL per write: a large reply is encrypted and queued in pieces
WRITE_CHUNK = 1 << 20
#: frames a remote client may not send: shared files cannot cross hosts, operator actions are local
_LOCAL_ONLY = {Kind.PASS_FDS: "file descriptors cannot cross a TCP connection", Kind.RELOAD: "reload", Kind.DRAIN: "drain"}


class RemoteDoor:
    """The TLS listener: one TlsStream per accepted TCP connection, made with the context of the moment."""

    def __init__(self, host: DoorHost) -> None:
        self.host = host
        self.loop = host.loop
        #: the listening settings as started: a reload swaps the context, never the address
        self.cfg: RemoteConfig = host.config.remote
        self.context = mtls.server_context(self.cfg)
        self.allowed = frozenset(self.cfg.allowed_clients)
        self.connections: set[RemoteConnection] = set()
        #: TLS streams accepted and not yet admitted (in their handshake)
        self.handshaking: set[TlsStream] = set()
        self.server: asyncio.base_events.Server | None = None
        self.listen_host = ""
        self.port = 0
        self.refused = {"handshake": 0, "not_allowed": 0}
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        address = self.cfg.address()
        assert address is not None
        sock = bind_tcp(address[0], address[1], "remote.listen")
        sock.setblocking(False)
        self.listen_host, self.port = sock.getsockname()[:2]
        self.server = await self.loop.create_server(self._stream, sock=sock, backlog=512)
        self._sweeper = self.loop.call_later(1.0, self._sweep_stalled)
        log.info("%s", access.remote_line(self.host.config, f"{self.listen_host}:{self.port}"))

    def _stream(self) -> TlsStream:
        return TlsStream(self, self.context, self.allowed)

    def reload(self, cfg: Config) -> None:
        """A reload was installed: new connections get a context built from the files as they are now
        (certificates, CA, CRL, allow-list); open ones keep theirs. The address is kept until a restart."""
        new = cfg.remote
        if new.listen is None:
            log.warning("reload: remote.listen was removed; the remote door keeps listening until a restart")
            return
        if new.listen != self.cfg.listen:
            log.warning("reload: remote.listen changed; the remote door keeps listening on %s:%s until a restart", self.listen_host, self.port)
        try:
            context = mtls.server_context(new)
        except mtls.TlsSetupError as exc:  # validated by the reload's config load; changed on disk since
            log.error("reload: remote.%s; new connections keep the previous certificates", exc)
            return
        self.context, self.cfg, self.allowed = context, new, frozenset(new.allowed_clients)
        log.info("remote door: certificates reloaded (%s, CA %s, %d allowed clients)", new.cert_file, new.client_ca_file, len(new.allowed_clients))

    def refuse_handshake(self, where: str, exc: BaseException | None) -> None:
        """OpenSSL refused the peer in the handshake (its alert is on the way to it), or it stalled."""
        self.refused["handshake"] += 1
        self.host.auth_failed("remote")
        if exc is None:
            reason = f"no complete handshake within {self.cfg.handshake_timeout:g}s (remote.handshake_timeout)"
        else:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (str(exc) or type(exc).__name__)
            if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
                reason = f"{reason}: {exc.verify_message}"  # expired, revoked, unknown CA
        log.warning("remote: refused %s in the TLS handshake: %s", where, reason)

    def _sweep_stalled(self) -> None:
        """Close connections that started a frame and stopped sending (daemon.read_timeout)."""
        limit = self.host.config.daemon.read_timeout
        now = self.loop.time()
        for c in list(self.connections):
            since = c.stream.partial_since
            if since is not None and now - since > limit:
                log.warning("remote: closing %s: a frame has been incomplete for over %gs (daemon.read_timeout)", c.peer_text, limit)
                c._refuse(0, Status.BAD_REQUEST, f"incomplete frame for over {limit:g}s (daemon.read_timeout); closing")
                c.stream.close_after_flush()
        self._sweeper = self.loop.call_later(min(1.0, limit / 2), self._sweep_stalled)

    def stop_listening(self) -> None:
        if self.server is None:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.server.close()
        self.server = None
        for stream in list(self.handshaking):
            stream.abort()

    def close_all(self) -> None:
        for c in list(self.connections):
            c.stream.close_after_flush()

    def describe(self) -> dict[str, Any]:
        return {
            "listen": f"{self.listen_host}:{self.port}" if self.port else None,
            "port": self.port,
            "auth": access.remote_auth(self.host.config),
            "connections": len(self.connections),
            "callers": sorted({str(c.caller) for c in self.connections}),
            "refused": dict(self.refused),
        }


class TlsStream(asyncio.BufferedProtocol):
    """One TCP connection: OpenSSL on memory buffers (``ssl.SSLObject``), then a ClientConnection's stream.

    The TLS state machine runs here rather than in asyncio's TLS transport so
    that (a) a handshake refusal's alert reaches the client before the close
    (asyncio drops it), which is what lets a client say "expired" or "unknown
    CA" instead of "connection closed", and (b) the allow-list check sits
    between the handshake and the first plaintext byte with nothing else in
    between. Decrypted bytes go straight into the FrameBuffer (``SSLObject.read``
    into its free space, a large frame's own buffer included): a 64 MB argument
    is copied once out of TLS, as the Unix door's kernel copies it once.
    """

    #: ClientConnection reads it; a TLS stream never carries descriptors
    accept_fds = False

    def __init__(self, door: RemoteDoor, context: ssl.SSLContext, allowed: frozenset[str]) -> None:
        self.door = door
        self.allowed = allowed
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self._cipher = bytearray(RECV_SIZE)  # what the socket brings, before decryption
        self.where = "?"
        self.transport: asyncio.Transport | None = None
        self.conn: RemoteConnection | None = None  # only once the certificate's name is allowed
        self.closed = False
        self.incoming = FrameBuffer(RECV_SIZE, door.host.config.daemon.max_message_bytes)
        #: loop time at which the current partial frame began, else None (stall detection)
        self.partial_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._reading = True

    # -- asyncio protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports have the methods, not the class
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        door = self.door
        limit = door.host.config.daemon.max_connections
        if len(door.connections) + len(door.handshaking) >= limit:
            log.warning("remote: refused a connection from %s: too many connections (%d, daemon.max_connections)", self.where, limit)
            self.abort()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are small writes: never hold them back
            except OSError:
                pass
        door.handshaking.add(self)
        self._timer = door.loop.call_later(float(door.cfg.handshake_timeout), self._handshake_timeout)

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self._cipher)

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed:
            return  # closing: whatever still arrives is dropped unread
        self._in.write(memoryview(self._cipher)[:nbytes])
        if self.conn is None:
            if not self._handshake():
                return
        self._read_plain()

    def eof_received(self) -> bool | None:
        return False  # close; replies still queued are flushed by the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._end_handshake()
        self.incoming.release()
        conn = self.conn
        if conn is not None:
            log.debug("remote: %s from %s closed", conn.caller, self.where)
            conn.on_close(self, exc)  # type: ignore[arg-type]  # on_close ignores its channel argument

    def pause_writing(self) -> None:
        # the client does not read its replies: stop reading its requests (they stay in its socket)
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self._reading and not self.closed and self.transport is not None:
            self._reading = True
            self.transport.resume_reading()

    # -- admission ----------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Advance the handshake with what arrived; True once it is done and the peer admitted."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            self._send_out()
            return False
        except ssl.SSLError as exc:
            self._send_out()  # OpenSSL's alert says why (certificate required, unknown CA, expired, revoked, version)
            self._end_handshake()
            self.door.refuse_handshake(self.where, exc)
            self.close_after_flush()
            return False
        self._send_out()
        self._end_handshake()
        # the handshake succeeded: OpenSSL verified the chain, the dates and the CRL
        cert = self._tls.getpeercert()
        subject = mtls.subject_text(cert) if cert else "-"
        identity = mtls.peer_identity(cert, self.allowed)
        if identity is None:
            door = self.door
            door.refused["not_allowed"] += 1
            door.host.auth_failed("remote")
            names = ", ".join(mtls.identities(cert)) if cert else "none"
            log.warning("remote: refused %s: certificate %s (names: %s) is not in remote.allowed_clients", self.where, subject, names)
            message = f"certificate {subject} is not allowed on this daemon (remote.allowed_clients)"
            self.write([frames.frame(Kind.REPLY, 0, json.dumps({"message": message}).encode(), Status.ACCESS_DENIED)])
            self.close_after_flush()  # nothing it sent is read: it stays in the TLS buffer, undecrypted
            return False
        log.info("remote: %s connected from %s (certificate %s, %s)", identity, self.where, subject, self._tls.version())
        self.conn = RemoteConnection(self.door, self, identity, subject)
        self.door.connections.add(self.conn)
        return True

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.conn is None and not self.closed:
            self.door.refuse_handshake(self.where, None)
            self.abort()

    def _end_handshake(self) -> None:
        self.door.handshaking.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the frames -----------------------------------------------------------------------

    def _read_plain(self) -> None:
        """Decrypt what is buffered straight into the frame buffer and hand each whole frame on."""
        conn = self.conn
        assert conn is not None
        fb = self.incoming
        tls = self._tls
        while self.serving():
            try:
                n = int(tls.read(RECV_SIZE, fb.space()))  # typeshed says bytes; with a buffer it is the count
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # the client closed its TLS session
                self.close_after_flush()
                return
            except ssl.SSLError as exc:
                log.warning("remote: closing %s: %s", conn.peer_text, exc.reason or exc)
                self.abort()
                return
            try:
                buf = fb.next(n)
                while buf is not None:
                    _, _, kind, status, reqid = fb.header
                    conn.on_frame(self, buf, kind, status, reqid)
                    if not self.serving():
                        return  # the frame closed the stream (a refusal that ends the connection)
                    buf = fb.next()
            except frames.FrameError as exc:
                # the stream cannot be resynchronised after a bad header: answer, then close
                conn._frame_error(self, exc)
                self.close_after_flush()
                return
        if self._out.pending:
            self._send_out()  # a post-handshake message's answer (key update)
        if fb.held():
            if self.partial_since is None:
                self.partial_since = self.door.loop.time()
        else:
            self.partial_since = None

    def serving(self) -> bool:
        """Not closed (a method, not the attribute: a frame's handler may close the stream under the loop)."""
        return not self.closed

    def _send_out(self) -> None:
        data = self._out.read()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- what ClientConnection needs of its stream -----------------------------------------

    def write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        tls = self._tls
        for p in parts:
            mv = memoryview(p).cast("B") if isinstance(p, memoryview) else memoryview(p)
            for off in range(0, len(mv), WRITE_CHUNK):
                tls.write(mv[off : off + WRITE_CHUNK])
                self._send_out()

    def close_after_flush(self) -> None:
        """Close once what is written has left: a TLS close_notify, then the transport's close (it flushes)."""
        if self.closed:
            return
        self.closed = True
        if self.conn is not None:
            try:
                self._tls.unwrap()
            except ssl.SSLError:
                pass  # SSLWantReadError: our close_notify is written, the peer's is not awaited
            self._send_out()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self._end_handshake()
        if self.transport is not None:
            self.transport.abort()

    def take_fd(self) -> int | None:
        return None  # a CALL that claims a descriptor is refused by RemoteConnection


class RemoteConnection(ClientConnection):
    """A remote client: the native door's frame handling, behind the remote door's restrictions."""

    def __init__(self, door: RemoteDoor, stream: TlsStream, identity: str, subject: str) -> None:
        # RemoteDoor has what ClientConnection uses of its server (host, loop, connections)
        super().__init__(door, None, f"tls:{identity}@{stream.where}", caller=identity, stream=stream)  # type: ignore[arg-type]
        self.stream = stream
        self.subject = subject

    def on_frame(self, channel: Any, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        if status & frames.CARRIES_FD and kind == Kind.CALL:
            self._refuse(reqid, Status.BAD_REQUEST, "a CALL over TCP cannot carry a file descriptor (send its arguments inline)")
            return
        local = _LOCAL_ONLY.get(kind)
        if local is not None:
            if kind == Kind.PASS_FDS:
                self._refuse(reqid, Status.BAD_REQUEST, local)
            else:
                self._refuse(reqid, Status.ACCESS_DENIED, f"{local} is a local operation: use the daemon's Unix socket (cruised {local})")
            return
        super().on_frame(channel, buf, kind, status, reqid)

    def _frame_error(self, channel: Any, exc: frames.FrameError) -> None:
        log.warning("remote: closing %s: %s", self.peer_text, exc)
        self._refuse(exc.reqid, Status.BAD_REQUEST, str(exc))
