"""A hand-made kdb+ IPC client for tests: exact bytes on the wire, pykx's codec for the data.

pykx's own clients cannot send a chosen handshake, a compressed message or a
malformed frame, and cannot read an async message the server sends
unprompted (the deferred-sync callbacks). ``RawQ`` can: a blocking socket,
the handshake written byte by byte, messages serialized and deserialized by
pykx (never by hand).

``q_compress`` produces kdb+ IPC compression (pykx reads it but never writes
it). It mirrors the decompressor of KX's c.java: per group of eight items a
flag byte; an item is either a literal byte or, when the two bytes at the
cursor were last seen at the position the 256-entry hash table (indexed by
the XOR of a byte pair) remembers, a reference: the table index and how many
further bytes (0..255) match. The table is updated exactly as the
decompressor updates it, so any reference emitted here resolves there.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any

os.environ.setdefault("PYKX_UNLICENSED", "true")
os.environ.setdefault("PYKX_SUPPRESS_WARNINGS", "true")
import pykx as kx

ASYNC, SYNC, RESPONSE = 0, 1, 2


class Refused(ConnectionError):
    """The server closed the socket during the handshake (q's 'access)."""


class RawQ:
    def __init__(self, port: int, *, unix: bool = False, creds: bytes = b":", cap: int | None = 6, timeout: float = 30.0) -> None:
        if unix:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(f"\0/tmp/kx.{port}")
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        hello = creds + (bytes([cap]) if cap is not None else b"") + b"\0"
        self.sock.sendall(hello)
        answer = self._recv_some(1)
        if not answer:
            self.sock.close()
            raise Refused("closed during the handshake")
        self.cap = answer[0]

    def _recv_some(self, n: int) -> bytes:
        try:
            return self.sock.recv(n)
        except ConnectionResetError:
            return b""

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ConnectionError("closed by the server")
            buf += chunk
        return bytes(buf)

    def message(self, obj: Any, msgtype: int) -> bytes:
        k = obj if isinstance(obj, kx.K) else kx.toq(obj)
        return bytes(kx.serialize(k, mode=self.cap or 1, wait=msgtype).copy())

    def send(self, obj: Any, msgtype: int = SYNC) -> None:
        self.sock.sendall(self.message(obj, msgtype))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> tuple[int, Any]:
        """(message type, object); an error response raises pykx's QError."""
        head = self._recv_exact(8)
        total = struct.unpack("<I" if head[0] == 1 else ">I", head[4:8])[0] | (head[3] << 32)
        data = head + self._recv_exact(total - 8)
        return head[1], kx.deserialize(data)

    def call(self, obj: Any) -> Any:
        self.send(obj, SYNC)
        msgtype, value = self.recv()
        assert msgtype == RESPONSE, f"expected a response, got message type {msgtype}"
        return value

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        """True once the server has closed this socket (reads EOF), within ``timeout``."""
        self.sock.settimeout(0.05)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.sock.recv(1 << 16) == b"":
                    return True
            except TimeoutError:
                continue
            except ConnectionResetError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawQ:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sym(name: str) -> Any:
    return kx.SymbolAtom(name)


def q_compress(msg: bytes) -> bytes:
    """``msg`` (a whole IPC message) compressed as kdb+ does it: header byte 2 set, u32 plain length, stream."""
    n = len(msg)
    out = bytearray(msg[:8])
    out[2] = 1
    out += struct.pack("<I", n)
    table = [0] * 256
    s = p = 8
    bit = 0
    flag_at = 0
    while s < n:
        if bit == 0:
            flag_at = len(out)
            out.append(0)
            bit = 1
        run = -1
        h = 0
        if s + 2 <= n:
            h = msg[s] ^ msg[s + 1]
            r = table[h]
            if r >= 8 and msg[r] == msg[s] and msg[r + 1] == msg[s + 1]:
                run = 0
                while run < 255 and s + 2 + run < n and msg[r + 2 + run] == msg[s + 2 + run]:
                    run += 1
        if run >= 0:
            out[flag_at] |= bit
            out.append(h)
            out.append(run)
            s += 2
        else:
            out.append(msg[s])
            s += 1
        while p < s - 1:  # the decompressor hashes every pair it has written, up to here
            table[msg[p] ^ msg[p + 1]] = p
            p += 1
        if run >= 0:
            s += run
            p = s
        bit = (bit << 1) & 0xFF
    struct.pack_into("<I", out, 4, len(out))
    return bytes(out)
