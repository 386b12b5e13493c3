"""The client's side of the remote door: ``cruised.TLS`` and a blocking TLS stream for ``_Connection``.

``cruised.session(host="h", port=7443, tls=cruised.TLS(cert_file=..., key_file=...,
ca_file=...))`` connects to a daemon's ``remote.listen`` (daemon/doors/remote.py):
TLS 1.3, the daemon's certificate verified against ``ca_file`` and the host name
(or ``server_hostname``), this client's certificate presented for the daemon to
verify against its ``client_ca_file`` and ``allowed_clients``.

Threading
    A session's connection is read by one thread at a time (leader/follower) while
    other threads send, so the stream must allow one reader and one writer at once.
    An ``ssl.SSLSocket`` does not promise that (both ends share one OpenSSL object,
    and TLS 1.3 lets a read produce bytes to send). ``TlsSocket`` therefore runs
    OpenSSL on memory buffers (``ssl.SSLObject``): every touch of the TLS state
    holds ``_state``, ciphertext is sent under ``_wlock`` in the order it was made,
    and the blocking socket I/O itself happens outside ``_state``, so a reader
    waiting for bytes never blocks a sender.

It offers the socket methods the session uses (``recv_into``, ``sendall``,
``sendmsg`` without descriptors, ``shutdown``, ``close``, ``fileno``, and the idle
probe ``recv(n, MSG_PEEK | MSG_DONTWAIT)``), so ``_Connection`` needs no TLS branch
on its hot path.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import Any

RECV_SIZE = 256 << 10
#: plaintext handed to OpenSSL per write: large arguments stream out in pieces this size
WRITE_CHUNK = 1 << 20
#: small parts are joined up to this before being encrypted (one TLS record holds 16 KiB)
COALESCE = 64 << 10


@dataclass(frozen=True)
class TLS:
    """Client certificate, its key, and the CA that signed the daemon's certificate (PEM files).

    ``server_hostname``: the name the daemon's certificate must carry, when it is not the
    host connected to (a load balancer's address, say); default: that host.
    """

    cert_file: str
    key_file: str
    ca_file: str
    server_hostname: str | None = None

    @classmethod
    def from_environment(cls, env: Any = None) -> TLS | None:
        """``CRUISED_TLS_CERT``, ``CRUISED_TLS_KEY``, ``CRUISED_TLS_CA`` (all three), else None."""
        env = os.environ if env is None else env
        values = [env.get(name) for name in ("CRUISED_TLS_CERT", "CRUISED_TLS_KEY", "CRUISED_TLS_CA")]
        if not any(values):
            return None
        missing = [name for name, v in zip(("CRUISED_TLS_CERT", "CRUISED_TLS_KEY", "CRUISED_TLS_CA"), values, strict=True) if not v]
        if missing:
            raise ValueError(f"a tls:// CRUISED_ADDRESS needs CRUISED_TLS_CERT, CRUISED_TLS_KEY and CRUISED_TLS_CA; missing {', '.join(missing)}")
        return cls(cert_file=str(values[0]), key_file=str(values[1]), ca_file=str(values[2]), server_hostname=env.get("CRUISED_TLS_SERVER_NAME") or None)

    def context(self) -> ssl.SSLContext:
        """A client context: TLS 1.3 only, the daemon verified against ``ca_file`` and its name, our certificate offered."""
        for what, path in (("cert_file", self.cert_file), ("key_file", self.key_file), ("ca_file", self.ca_file)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"cruised.TLS {what}: no such file: {path}")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except ssl.SSLError as exc:
            raise ssl.SSLError(exc.errno, f"cruised.TLS: cannot use cert_file {self.cert_file} with key_file {self.key_file}: {exc.reason or exc}") from None
        return ctx


def describe_tls_error(exc: BaseException) -> str:
    """What an SSL error means to someone holding a client certificate."""
    reason = getattr(exc, "reason", None) or str(exc)
    hints = {
        "CERTIFICATE_VERIFY_FAILED": "the daemon's certificate is not signed by ca_file, has expired, or does not name this host (server_hostname)",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the daemon requires a client certificate",
        "TLSV1_ALERT_UNKNOWN_CA": "the daemon does not trust the CA that signed this client certificate (its remote.client_ca_file)",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the daemon refused this client certificate: it has expired",
        "SSLV3_ALERT_CERTIFICATE_REVOKED": "the daemon refused this client certificate: it is revoked (remote.crl_file)",
        "TLSV1_ALERT_PROTOCOL_VERSION": "the daemon speaks TLS 1.3 only",
    }
    hint = hints.get(str(reason))
    return f"{reason}: {hint}" if hint else str(reason)


class TlsSocket:
    """A connected, handshaken TLS 1.3 stream with the socket methods ``_Connection`` calls (see the module docstring)."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext, server_hostname: str) -> None:
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=False, server_hostname=server_hostname)
        self._state = threading.Lock()  # the OpenSSL object: one thread at a time
        self._wlock = threading.Lock()  # ciphertext leaves in the order it was made; taken before _state
        #: plaintext the idle probe decrypted, handed out first by recv_into
        self._early = bytearray()
        self._handshake()

    def _handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_out()
                data = self.raw.recv(RECV_SIZE)
                if not data:
                    raise ConnectionResetError("the daemon closed the connection during the TLS handshake") from None
                self._in.write(data)
        self._send_out()

    def version(self) -> str | None:
        return self._obj.version()

    def getpeercert(self) -> dict[str, Any] | None:
        return self._obj.getpeercert()

    def fileno(self) -> int:
        return self.raw.fileno()

    def _send_out(self) -> None:
        """Send what OpenSSL has produced (caller holds ``_wlock``, or is alone: the handshake)."""
        with self._state:
            data = self._out.read()
        if data:
            self.raw.sendall(data)

    # -- receiving ---------------------------------------------------------------------

    def recv_into(self, view: memoryview | bytearray) -> int:
        """Blocking read of decrypted bytes into ``view``; 0 at the end of the stream. SSL errors
        (the daemon's alert refusing our certificate) raise as they are: ``OSError`` subclasses."""
        view = memoryview(view).cast("B")
        if self._early:
            n = min(len(view), len(self._early))
            view[:n] = self._early[:n]
            del self._early[:n]
            return n
        while True:
            with self._state:
                try:
                    n = int(self._obj.read(len(view), view))  # typeshed says bytes; with a buffer it is the count
                except ssl.SSLWantReadError:
                    n = -1
                except ssl.SSLZeroReturnError:
                    return 0  # the daemon closed the TLS session
                produced = self._out.pending
            if produced:  # a post-handshake message wants an answer (key update)
                with self._wlock:
                    self._send_out()
            if n > 0:
                return n
            data = self.raw.recv(RECV_SIZE)
            if not data:
                return 0
            with self._state:
                self._in.write(data)

    def pending(self) -> int:
        """Bytes ``recv_into`` may return without reading the socket (decrypted, or ciphertext
        already read): the session's reader skips its ``poll`` then, which cannot see them."""
        with self._state:
            return len(self._early) + self._obj.pending() + self._in.pending

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Only the session's idle probe, ``recv(1, MSG_PEEK | MSG_DONTWAIT)``: b"" once the daemon
        has closed the stream, else some bytes (kept for ``recv_into``); BlockingIOError if nothing came."""
        data = self.raw.recv(RECV_SIZE, socket.MSG_DONTWAIT)  # BlockingIOError: nothing there
        if not data:
            return b""
        with self._state:
            self._in.write(data)
            try:
                plain = self._obj.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                return b"\0"  # part of a record: the stream is open
            except ssl.SSLZeroReturnError:
                return b""
        self._early += plain
        return plain[:bufsize] or b"\0"

    # -- sending -----------------------------------------------------------------------

    def sendall(self, data: Any) -> None:
        self.sendmsg([data])

    def send(self, data: Any) -> int:
        return self.sendmsg([data])

    def sendmsg(self, parts: list[Any], ancdata: Any = None) -> int:
        """Encrypt and send every part, in order (blocking, whole); returns the plaintext bytes sent."""
        if ancdata:
            raise OSError("file descriptors cannot be passed over a TLS connection")
        total = 0
        pending = bytearray()
        with self._wlock:
            for p in parts:
                mv = memoryview(p).cast("B")
                total += len(mv)
                if len(mv) < COALESCE:
                    pending += mv
                    if len(pending) >= COALESCE:
                        self._write(memoryview(pending))
                        pending = bytearray()
                    continue
                if pending:
                    self._write(memoryview(pending))
                    pending = bytearray()
                self._write(mv)
            if pending:
                self._write(memoryview(pending))
        return total

    def _write(self, mv: memoryview) -> None:
        """Encrypt ``mv`` in pieces and send each one (holding ``_wlock``)."""
        for off in range(0, len(mv), WRITE_CHUNK):
            with self._state:
                self._obj.write(mv[off : off + WRITE_CHUNK])
                data = self._out.read()
            self.raw.sendall(data)

    # -- closing -----------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def close(self) -> None:
        self.raw.close()

    def settimeout(self, value: float | None) -> None:
        self.raw.settimeout(value)


def connect(host: str, port: int, tls: TLS, timeout: float) -> TlsSocket:
    """A TCP connection to ``host:port`` with the TLS handshake done (within ``timeout``)."""
    context = tls.context()
    raw = socket.create_connection((host, port), timeout=timeout)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a call is one small write: never wait to coalesce it
        stream = TlsSocket(raw, context, tls.server_hostname or host)
        raw.settimeout(None)
    except BaseException:
        raw.close()
        raise
    return stream
