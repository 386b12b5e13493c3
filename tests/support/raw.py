"""The native protocol by hand: a bare Unix-socket connection and a blocking frame reader."""

from __future__ import annotations

import socket

from cruised.pool.wire import frames


def raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    head = b""
    while len(head) < frames.HEADER_SIZE:
        chunk = sock.recv(frames.HEADER_SIZE - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    total, kind, status, reqid = frames.parse_header(head, 1 << 40)
    body = b""
    while len(body) < total - frames.HEADER_SIZE:
        body += sock.recv(total - frames.HEADER_SIZE - len(body))
    return kind, status, reqid, body
