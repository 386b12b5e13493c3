"""The native front door: framed requests over a Unix socket.

Each connection turns frames into jobs and hands them to the pool's
dispatcher; replies come back through the same connection object (it is the
jobs' ``ReplySink``). Function and argument bytes are never unpickled here:
the CALL frame that arrived is the frame the worker receives, with only the
request id patched in place, and the worker's REPLY frame goes back to the
client the same way.

The door sees the daemon only through ``DoorHost`` (daemon/doors/host.py):
the serving pools' dispatchers, the config, the status and metrics
documents, reloads and the count of refused peers.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import struct
from typing import TYPE_CHECKING, Any

from cruised.core.channel import Channel
from cruised.core.dispatch import Job
from cruised.doors.sockets import next_job_id, peer_credentials, uid_caller
from cruised.pool.wire import frames, sharedfile
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.doors.host import DoorHost

log = logging.getLogger("cruised.server")


class NativeServer:
    def __init__(self, host: DoorHost, sock: socket.socket, path: str | None) -> None:
        self.host = host
        self.sock = sock
        self.path = path
        self.loop = host.loop
        self.connections: set[ClientConnection] = set()
        self.loop.add_reader(sock.fileno(), self._accept)
        self.listening = True
        self._sweeper = self.loop.call_later(1.0, self._sweep_stalled)

    def _sweep_stalled(self) -> None:
        """Close connections that started a frame and stopped sending (daemon.read_timeout)."""
        limit = self.host.config.daemon.read_timeout
        now = self.loop.time()
        for c in list(self.connections):
            since = c.channel.partial_since
            if since is not None and now - since > limit:
                log.warning("closing client pid=%s: a frame has been incomplete for over %gs (daemon.read_timeout)", c.peer[0], limit)
                c._refuse(0, Status.BAD_REQUEST, f"incomplete frame for over {limit:g}s (daemon.read_timeout); closing")
                c.channel.close_after_flush()
        self._sweeper = self.loop.call_later(min(1.0, limit / 2), self._sweep_stalled)

    def _accept(self) -> None:
        for _ in range(64):  # bounded per wakeup: keep the loop fair to established clients
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("accept failed: %s", exc)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        cfg = self.host.config.daemon
        try:
            pid, uid, gid = peer_credentials(conn)
        except OSError:
            pid = uid = gid = -1
        refusal = None
        if len(self.connections) >= cfg.max_connections:
            refusal = (Status.QUEUE_FULL, f"too many connections ({cfg.max_connections}, daemon.max_connections)")
        elif (cfg.allow_uids or cfg.allow_gids) and uid not in cfg.allow_uids and gid not in cfg.allow_gids:
            log.warning("refused connection from pid=%s uid=%s gid=%s: not in daemon.allow_uids/allow_gids", pid, uid, gid)
            self.host.auth_failed("native")
            refusal = (Status.ACCESS_DENIED, f"uid {uid} / gid {gid} may not use this daemon (daemon.allow_uids, daemon.allow_gids)")
        if refusal is not None:
            try:
                conn.setblocking(False)
                conn.send(frames.frame(Kind.REPLY, 0, json.dumps({"message": refusal[1]}).encode(), refusal[0]))
            except OSError:
                pass
            conn.close()
            return
        self.connections.add(ClientConnection(self, conn, (pid, uid, gid)))

    def stop_listening(self) -> None:
        if not self.listening:
            return
        self.listening = False
        self._sweeper.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.path:
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close_all(self) -> None:
        for c in list(self.connections):
            c.channel.close_after_flush()


class ClientConnection:
    """One client: its frames in, its replies out. Also the ReplySink of its jobs."""

    def __init__(
        self, server: NativeServer, sock: socket.socket | None, peer: tuple[int, int, int] | str, caller: str | None = None, stream: Any = None
    ) -> None:
        """A Unix-socket client: ``sock`` and its (pid, uid, gid). The remote door (daemon/doors/remote.py)
        passes no socket but its TLS ``stream`` (the part of Channel used here), the peer as
        ``tls:<name>@<ip>:<port>`` and the certificate's allowed name as ``caller``."""
        self.server = server
        self.host = server.host
        self.peer = peer
        if isinstance(peer, tuple):
            self.peer_text = f"pid:{peer[0]},uid:{peer[1]},gid:{peer[2]}"  # the access log's peer= field
            #: who its jobs are for (daemon/core/fairness.py): the peer's user here, the
            #: certificate's allowed name on the remote door
            self.caller: str = uid_caller(peer[1])
        else:
            self.peer_text = peer
            self.caller = caller or peer
        if stream is not None:
            self.channel = stream
        else:
            assert sock is not None and isinstance(peer, tuple)
            self.channel = Channel(
                server.loop,
                sock,
                self,
                self.host.config.daemon.max_message_bytes,
                name=f"client-pid{peer[0]}",
                on_frame_error=self._frame_error,
            )

    # -- FrameSink -------------------------------------------------------------

    def on_frame(self, channel: Channel, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        try:
            if kind == Kind.CALL:
                pool, timeout_ms, key, _ = frames.parse_call(buf)
                shared = None
                if status & frames.CARRIES_FD:
                    fd = channel.take_fd()
                    if fd is None:  # the kernel dropped it: we were not reading with recvmsg
                        self._refuse(reqid, Status.BAD_REQUEST, "a CALL carried a file descriptor before PASS_FDS was answered")
                        return
                    shared = sharedfile.Owned(fd)
                    try:
                        sharedfile.check(shared.fd, self.host.config.daemon.max_message_bytes)
                    except (sharedfile.SharedFileError, OSError) as exc:
                        shared.close()
                        self._refuse(reqid, Status.BAD_REQUEST, str(exc))
                        return
                disp = self.host.dispatcher(pool)
                if disp is None:
                    self._refuse(reqid, Status.NO_SUCH_POOL, self.host.no_such_pool(pool))
                    return
                job = Job(
                    id=next_job_id(),
                    kind=Kind.CALL,
                    frame=buf,
                    sink=self,
                    client=self,
                    client_reqid=reqid,
                    key=key,
                    timeout=timeout_ms / 1000 if timeout_ms else None,
                    shared=shared,
                    caller=self.caller,
                    credited=status & frames.CREDITED != 0,
                )
                disp.submit(job)
            elif status & frames.CARRIES_FD:
                self._refuse(reqid, Status.BAD_REQUEST, f"only a CALL may carry a file descriptor (frame kind {kind})")
            elif kind == Kind.CANCEL:
                # no reply of its own: the call it names gets its one answer (CANCELLED, or its
                # result if it had finished); a call already answered is no longer found
                for disp in self.host.all_dispatchers():
                    if disp.cancel(self, reqid):
                        break
            elif kind == Kind.PASS_FDS:
                # before the reply goes out: whatever the client sends after reading it is read with recvmsg
                self.channel.accept_fds = True
                self.channel.write([frames.frame(Kind.REPLY, reqid, frames.FEATURES.pack(frames.FILE_PICKLE))])
            elif kind == Kind.REGISTER:
                self._register(buf, reqid)
            elif kind == Kind.CREDIT:
                self._credit_request(buf, reqid)
            elif kind == Kind.CHECK:
                pool, _ = frames.unpack_name(buf, frames.HEADER_SIZE)
                disp = self.host.dispatcher(pool)
                if disp is None:
                    self._refuse(reqid, Status.NO_SUCH_POOL, self.host.no_such_pool(pool))
                    return
                disp.submit(Job(id=next_job_id(), kind=Kind.CHECK, frame=buf, sink=self, client=self, client_reqid=reqid, endpoint="check", caller=self.caller))
            elif kind == Kind.STATUS:
                self._reply_json(reqid, self.host.status())
            elif kind == Kind.PING:
                self.channel.write([frames.frame(Kind.REPLY, reqid)])
            elif kind == Kind.METRICS:
                self.channel.write([frames.frame(Kind.REPLY, reqid, self.host.render_metrics())])
            elif kind == Kind.DRAIN:
                self._drain(buf, reqid)
            elif kind == Kind.RELOAD:
                self.host.request_reload(lambda ok, msg: self._reply_json(reqid, {"ok": ok, "message": msg}, Status.OK if ok else Status.BAD_REQUEST))
            else:
                self._refuse(reqid, Status.BAD_REQUEST, f"unknown frame kind {kind}")
        except (frames.FrameError, ValueError, UnicodeDecodeError, struct.error) as exc:
            # the frame boundary is intact, so only this request fails
            self._refuse(reqid, Status.BAD_REQUEST, f"malformed request: {exc}")

    def _register(self, buf: bytearray, reqid: int) -> None:
        pool, key, meta_raw, _ = frames.parse_register(buf)
        disp = self.host.dispatcher(pool)
        if disp is None:
            self._refuse(reqid, Status.NO_SUCH_POOL, self.host.no_such_pool(pool))
            return
        meta = json.loads(meta_raw)
        client_py = meta.get("python")
        if disp.python and client_py and client_py != disp.python:
            self._refuse(
                reqid,
                Status.VERSION_MISMATCH,
                f"function {meta.get('name')!r} comes from Python {client_py}, but pool {pool!r} runs Python "
                f"{disp.python}: shipped bytecode cannot cross minor versions; use a pool whose python matches",
            )
            return
        buf[frames.KIND_OFFSET] = Kind.DEFINE
        frames.set_reqid(buf, 0)
        disp.register(key, buf)
        self.channel.write([frames.frame(Kind.REPLY, reqid)])

    def _credit_request(self, buf: bytearray, reqid: int) -> None:
        """Open (want 1) or close (want 0) flow control on a pool; the reply is the credit granted now."""
        pool, want = frames.parse_credit(buf)
        disp = self.host.dispatcher(pool)
        if disp is None:
            self._refuse(reqid, Status.NO_SUCH_POOL, self.host.no_such_pool(pool))
            return
        granted = 0
        if want:
            granted = disp.open_credit(self, self.caller)
        else:
            disp.close_credit(self)
        self.channel.write([frames.frame(Kind.REPLY, reqid, frames.CREDIT_COUNT.pack(granted))])

    def credit(self, pool: str, n: int) -> None:
        """The pool grants this connection ``n`` more credits (daemon/core/fairness.py)."""
        self.channel.write([frames.credit_frame(pool, n)])

    def _drain(self, buf: bytearray, reqid: int) -> None:
        """DRAIN: ``{"drain": bool, "linger": seconds}`` starts (linger optional) or ends a drain, ``{}`` (or
        nothing) only asks; the reply is the drain report."""
        raw = bytes(buf[frames.HEADER_SIZE :])
        request = _drain_request(json.loads(raw) if raw.strip() else {})
        if request is None:
            self._refuse(reqid, Status.BAD_REQUEST, 'a DRAIN payload is {"drain": true, "linger": seconds (optional, 0 to 86400)}, {"drain": false} or {}')
            return
        on, linger = request
        if on is not None:
            log.info("drain %s by client pid=%s uid=%s", "started" if on else "ended", self.peer[0], self.peer[1])
        self._reply_json(reqid, self.host.drain(on, linger))

    def on_close(self, channel: Channel, error: BaseException | None) -> None:
        self.server.connections.discard(self)
        for disp in self.host.all_dispatchers():
            disp.drop_client(self)

    def _frame_error(self, channel: Channel, exc: frames.FrameError) -> None:
        log.warning("closing client pid=%s: %s", self.peer[0], exc)
        self._refuse(exc.reqid, Status.BAD_REQUEST, str(exc))

    # -- ReplySink -------------------------------------------------------------

    def forward(self, job: Job, buf: bytearray, status: int) -> None:
        frames.set_reqid(buf, job.client_reqid)
        self.channel.write([buf])

    def refuse(self, job: Job, status: int, message: str) -> None:
        self._refuse(job.client_reqid, status, message)

    def _refuse(self, reqid: int, status: int, message: str) -> None:
        self.channel.write([frames.frame(Kind.REPLY, reqid, json.dumps({"message": message}).encode(), status)])

    def _reply_json(self, reqid: int, obj: Any, status: int = Status.OK) -> None:
        self.channel.write([frames.frame(Kind.REPLY, reqid, json.dumps(obj).encode(), status)])


def _drain_request(request: object) -> tuple[bool | None, float] | None:
    """A DRAIN payload's ``(drain, linger)``, or None when it is not one (``linger`` only with ``"drain": true``)."""
    if not isinstance(request, dict) or set(request) - {"drain", "linger"}:
        return None
    on, linger = request.get("drain"), request.get("linger", 0)
    if not (on is None or isinstance(on, bool)) or isinstance(linger, bool) or not isinstance(linger, (int, float)):
        return None
    if not 0 <= linger < 86400 or (linger and on is not True):
        return None
    return on, float(linger)
