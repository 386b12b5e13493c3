"""The floor: what a perfect daemon could not beat, measured with the same framing.

``echo`` is a second process that reads cruised frames (pool/wire/frames.py: a
16-byte header, then the payload) from a socketpair and writes each one back
unchanged: one hop, client -> worker -> client. ``pump`` sits between the
client and an ``echo`` process and forwards bytes both ways without looking at
them: two hops, client -> middle -> worker and back, which is the shape of any
supervisor-in-the-middle daemon. Neither unpickles anything; the client sends
payloads of exactly the size cruised would send for the same call, so the
ratio cruised / floor is the price of everything cruised does beyond moving
the bytes.

Run as ``python -m bench.floor echo FD`` or ``python -m bench.floor pump FD FD``
(both started by ``FloorSystem``; they exit at EOF).
"""

from __future__ import annotations

import selectors
import socket
import struct
import subprocess
import sys
from collections import deque
from typing import Any

from cruised.pool.wire import frames, sockopt

RECV_SIZE = 256 << 10
_SIZE = struct.Struct("<I")


class FrameReader:
    """Buffered blocking frame reader: many small frames per recv, big frames straight into their own buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray(RECV_SIZE)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def read(self) -> memoryview | bytearray | None:
        """The next whole frame (valid until the next call), or None at EOF."""
        hs = frames.HEADER_SIZE
        while True:
            have = self.end - self.start
            if have >= hs:
                total = _SIZE.unpack_from(self.buf, self.start)[0] + 4
                if have >= total:
                    out = self.view[self.start : self.start + total]
                    self.start += total
                    return out
                if total > len(self.buf):
                    big = bytearray(total)
                    big[:have] = self.view[self.start : self.end]
                    self.start = self.end = 0
                    got = have
                    mv = memoryview(big)
                    while got < total:
                        n = self.sock.recv_into(mv[got:])
                        if n == 0:
                            return None
                        got += n
                    return big
            if self.start and (self.end == len(self.buf) or self.start == self.end):
                self.buf[:have] = self.view[self.start : self.end]
                self.start, self.end = 0, have
            n = self.sock.recv_into(self.view[self.end :])
            if n == 0:
                return None
            self.end += n


def sendall(sock: socket.socket, parts: list[Any]) -> None:
    if len(parts) == 1:
        sock.sendall(parts[0])  # the common echo case: one buffer, one syscall
        return
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views[:512])
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]


def echo_main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    reader = FrameReader(sock)
    while True:
        f = reader.read()
        if f is None:
            return 0
        sendall(sock, [f])


def pump_main(fd_a: int, fd_b: int) -> int:
    """Forward bytes a<->b, non-blocking, with per-direction backlogs (big payloads cannot deadlock)."""
    a, b = socket.socket(fileno=fd_a), socket.socket(fileno=fd_b)
    for s in (a, b):
        s.setblocking(False)
    peer = {a: b, b: a}
    backlog: dict[socket.socket, deque[memoryview]] = {a: deque(), b: deque()}
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ)
    sel.register(b, selectors.EVENT_READ)
    buf = {a: bytearray(RECV_SIZE), b: bytearray(RECV_SIZE)}

    def interest(s: socket.socket) -> None:
        sel.modify(s, selectors.EVENT_READ | (selectors.EVENT_WRITE if backlog[s] else 0))

    def flush(s: socket.socket) -> None:
        q = backlog[s]
        while q:
            try:
                n = s.send(q[0])
            except BlockingIOError:
                break
            if n == q[0].nbytes:
                q.popleft()
            else:
                q[0] = q[0][n:]
                break
        interest(s)

    while True:
        for key, events in sel.select():
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if events & selectors.EVENT_WRITE:
                flush(s)
            if events & selectors.EVENT_READ:
                try:
                    n = s.recv_into(buf[s])
                except BlockingIOError:
                    continue
                if n == 0:
                    return 0
                out = peer[s]
                backlog[out].append(memoryview(bytes(memoryview(buf[s])[:n])))
                flush(out)


class FloorSystem:
    """The client side of the floor rows: ``call`` and ``pipelined`` over a framed socketpair."""

    def __init__(self, hops: int, window: int) -> None:
        self.hops = hops
        self.window = window
        self.name = "floor-1hop" if hops == 1 else "floor-2hop"
        self.procs: list[subprocess.Popen[bytes]] = []
        ours, theirs = socket.socketpair()
        mid_in = mid_out = None
        if hops == 2:
            mid_in, mid_out = socket.socketpair()
        for s in (ours, theirs, mid_in, mid_out):
            if s is not None:
                sockopt.size_buffers(s)  # the same buffer sizes as cruised's channels: a fair floor
        if hops == 1:
            self.procs.append(_spawn("echo", theirs))
        else:
            assert mid_in is not None and mid_out is not None
            self.procs.append(_spawn("echo", mid_out))
            self.procs.append(_spawn("pump", theirs, mid_in))
        self.sock = ours
        self.reader = FrameReader(ours)
        self.reqid = 0

    @staticmethod
    def prepare(payload_len: int) -> bytes:
        return b"\x00" * payload_len

    def call(self, payload: bytes) -> int:
        self.reqid += 1
        head = frames.header(frames.Kind.CALL, self.reqid, len(payload))
        if len(payload) < 4096:
            self.sock.sendall(head + payload)  # small: one copy is cheaper than a scatter list
        else:
            sendall(self.sock, [head, payload])
        f = self.reader.read()
        assert f is not None
        return len(f)

    def pipelined(self, payload: bytes, n: int) -> int:
        inflight = 0
        done = 0
        sent = 0
        while done < n:
            while sent < n and inflight < self.window:
                self.reqid += 1
                sendall(self.sock, [frames.header(frames.Kind.CALL, self.reqid, len(payload)), payload])
                sent += 1
                inflight += 1
            f = self.reader.read()
            assert f is not None
            inflight -= 1
            done += 1
        return done

    def close(self) -> None:
        self.sock.close()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _spawn(role: str, *socks: socket.socket) -> subprocess.Popen[bytes]:
    fds = [s.fileno() for s in socks]
    p = subprocess.Popen([sys.executable, "-m", "bench.floor", role, *map(str, fds)], pass_fds=fds, stdin=subprocess.DEVNULL)
    for s in socks:
        s.close()
    return p


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "echo":
        sys.exit(echo_main(int(sys.argv[2])))
    if role == "pump":
        sys.exit(pump_main(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit(f"unknown role {role!r}")
